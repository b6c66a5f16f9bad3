"""Measure the shipped demo models for dsedge/demo/MODEL_CARD.md and print one JSON object.

    python scripts/demo_report.py --work /tmp/demo-work > /tmp/demo-report.json

Per model: parameter counts and bytes (dsedge.inspection), reader validation, held-out perplexity and
top-1 accuracy (dsedge.evaluation, window 512), the add-one unigram baseline of the same tokenizer on
exactly the same scored tokens, per-expert token shares on the held-out text, and greedy continuations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

PROMPTS = (  # plain-text continuations, in the corpus' own voice
    "The os module provides",
    "A list comprehension consists of",
    "To read a file line by line,",
)
CHAT_QUESTION = "Tell me about Reading and Writing Files."


def main(argv=None) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_demo.main
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="the train_demo.py work directory (for the train ids)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--models", nargs="*", help="demo model names (default: all)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from dsedge.demo import DEMO_MODELS

    print(json.dumps({name: report(name, args) for name in args.models or DEMO_MODELS}, indent=2))


def report(name: str, args) -> dict:
    from dsedge.demo import heldout_path, model_path
    from dsedge.evaluation import encode_text_file, evaluate_perplexity, torch_logits_fn, unigram_perplexity
    from dsedge.inspection import inspect_checkpoint
    from dsedge.models.reference import load_reference_model

    path = model_path(name)
    inspected = inspect_checkpoint(path)  # validates every tensor against the spec
    ids = encode_text_file(path / "tokenizer.json", heldout_path())
    model = load_reference_model(path)
    counter = _expert_counter(model)
    evaluation = evaluate_perplexity(torch_logits_fn(model), ids, window=args.window, batch_size=args.batch_size)
    scored = [t for i, t in enumerate(ids) if i % args.window != 0]  # the tokens the model was scored on
    vocab = inspected.spec["vocab_size"]
    train_ids = np.load(Path(args.work) / "train_ids.npy")
    return {
        "params": {k: inspected.params[k] for k in ("total", "active")},
        "bytes_on_disk": inspected.bytes_on_disk, "bytes_by_dtype": inspected.bytes_by_dtype,
        "directory_bytes": sum(f.stat().st_size for f in path.iterdir()),
        "heldout": evaluation.to_json(),
        "unigram_perplexity_same_tokens": unigram_perplexity(train_ids, scored, vocab),
        "expert_shares": counter.shares() if counter else None,
        "continuations": {p: _greedy(model, path, p, args.new_tokens) for p in PROMPTS},
        "chat": {CHAT_QUESTION: _chat(model, path, CHAT_QUESTION, args.new_tokens * 2)},
    }


class _ExpertCounter:
    """Per-MoE-layer counts of routed-expert selections, from a hook on each router."""

    def __init__(self, routers: dict):
        self.counts = {name: np.zeros(r.num_experts, dtype=np.int64) for name, r in routers.items()}
        for name, router in routers.items():
            router.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def record(module, inputs, output):
            indices = output[2].flatten().numpy()  # topk_indices [tokens, k]
            self.counts[name] += np.bincount(indices, minlength=module.num_experts)

        return record

    def shares(self) -> dict:
        """Each layer's share of selections per expert (uniform = 1/E), with min and max."""
        out = {}
        for name, counts in self.counts.items():
            share = counts / counts.sum()
            layer = name.split(".")[2]
            out[f"layer {layer}"] = {"shares": [round(float(s), 4) for s in share],
                                     "min": round(float(share.min()), 4), "max": round(float(share.max()), 4),
                                     "uniform": round(1 / len(share), 4)}
        return out


def _expert_counter(model):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_demo import _routers

    routers = _routers(model)
    return _ExpertCounter(routers) if routers else None


def _greedy(model, path: Path, prompt: str, new_tokens: int) -> str:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return _generate(model, tokenizer, tokenizer.encode(prompt).ids, new_tokens)


def _chat(model, path: Path, question: str, new_tokens: int) -> str:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return _generate(model, tokenizer, tokenizer.encode(text, add_special_tokens=False).ids, new_tokens)


def _generate(model, tokenizer, ids: list[int], new_tokens: int) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=1, pad_token_id=1)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


if __name__ == "__main__":
    main()
