"""Train dsedge's demo models on this machine's CPU: a tiny DeepSeek-V3 MoE and its dense Qwen2 twin.

Both are transformers' own classes (DeepseekV3ForCausalLM, Qwen2ForCausalLM), trained in float32 from
a seed on the Python 3.11 documentation (see scripts/demo_corpus.py) and saved in bf16 in HF layout.

Steps (as recorded, with measured times, in dsedge/demo/MODEL_CARD.md):

    # 1. the corpus: Debian's python3.11-doc, extracted without installing it
    apt-get update
    cd /tmp && apt-get download python3.11-doc && dpkg -x /tmp/python3.11-doc_*_all.deb /tmp/pydoc && cd -
    # 2. split, tokenizer, token ids (~40 s); ship the held-out split
    python scripts/train_demo.py prepare --corpus /tmp/pydoc --work /tmp/demo-work
    cp /tmp/demo-work/heldout.txt dsedge/demo/data/heldout.txt
    # 3. train each model (~50 and ~27 min on 2 shared cores); after an interruption rerun the same
    #    command: --resume continues from the last checkpoint, or starts fresh when there is none
    nice -n 19 python scripts/train_demo.py train --arch deepseek-v3 --work /tmp/demo-work \
        --out dsedge/demo/models/deepseek-v3-tiny --resume
    nice -n 19 python scripts/train_demo.py train --arch qwen2 --work /tmp/demo-work \
        --out dsedge/demo/models/qwen2-tiny --resume
    # 4. the model card's numbers
    python scripts/demo_report.py --work /tmp/demo-work

Routing balance follows DeepSeek-V3's auxiliary-loss-free strategy (DeepSeek-V3 Technical Report,
arXiv:2412.19437, §2.1.2): after every step each MoE layer's ``e_score_correction_bias`` moves by
``γ·sign(mean_load − load_i)``; the bias only affects which experts are selected, never the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import demo_corpus
import numpy as np

BPE_VOCAB_SIZE = 3987  # + 13 chat/tool tokens = 4000 ids
TOKEN_DTYPE = np.uint16  # every id < 65536
ARCHES = ("deepseek-v3", "qwen2")


# ----------------------------------------------------------------------------- model configs


def model_config(arch: str, vocab_size: int, max_positions: int) -> dict:
    """config.json fields of each demo model; sized so both train in ~1.5 h on 2 shared CPU cores.

    The Qwen2 twin's MLP width makes its active parameters (~3.1M without the embedding) match the
    MoE model's (one dense layer, shared expert and top-2 of 12 routed experts per MoE layer).
    """
    common = {"vocab_size": vocab_size, "hidden_size": 224, "num_hidden_layers": 5, "hidden_act": "silu",
              "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "initializer_range": 0.02, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
              "use_cache": True}
    if arch == "qwen2":
        return {**common, "model_type": "qwen2", "intermediate_size": 480, "num_attention_heads": 8,
                "num_key_value_heads": 2, "use_sliding_window": False, "max_window_layers": 5}
    return {**common, "model_type": "deepseek_v3",
            # MLA with q-LoRA; v_head_dim equals qk_nope_head_dim as in V3 (128/128), rope part separate
            "num_attention_heads": 6, "num_key_value_heads": 6, "q_lora_rank": 96, "kv_lora_rank": 64,
            "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "rope_interleave": True,
            "intermediate_size": 576, "first_k_dense_replace": 1,
            # 12 routed experts in 4 groups of 3, top-2 within the best 2 groups, plus 1 shared expert
            "n_routed_experts": 12, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 144,
            "n_group": 4, "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
            "scoring_func": "sigmoid", "topk_method": "noaux_tc", "num_nextn_predict_layers": 0}


def build_model(arch: str, vocab_size: int, max_positions: int, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = model_config(arch, vocab_size, max_positions)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)  # the initial weights depend on the seed only
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


# ----------------------------------------------------------------------------- prepare


def prepare(args) -> None:
    """Corpus → cleaned pages → held-out split → tokenizer → token-id streams, all in --work."""
    from dsedge.testing.tokenizer import EOS_ID, train_deepseek_bpe

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    docs = demo_corpus.read_documents(args.corpus)
    train_docs, heldout_docs = demo_corpus.split_documents(docs, seed=args.split_seed)
    tokenizer = _prepare_tokenizer(args.tokenizer, [d.text for d in train_docs], train_deepseek_bpe)
    (work / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    chats = [demo_corpus.render_chat(q, a) for d in train_docs for q, a in demo_corpus.chat_pairs(d)]
    # Pages as bos + text + eos; chat exchanges already carry bos/eos from the template.
    page_ids = [tokenizer.encode(d.text).ids + [EOS_ID] for d in train_docs]
    chat_ids = [tokenizer.encode(c, add_special_tokens=False).ids for c in chats]
    stream = np.array([i for ids in page_ids + chat_ids for i in ids], dtype=TOKEN_DTYPE)
    np.save(work / "train_ids.npy", stream)
    heldout = demo_corpus.heldout_text(heldout_docs)
    (work / "heldout.txt").write_text(heldout, encoding="utf-8")
    stats = _corpus_stats(args, docs, train_docs, heldout_docs, heldout, tokenizer, page_ids, chat_ids)
    (work / "corpus.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in stats.items() if k != "heldout_documents"}, indent=2))


def _corpus_stats(args, docs, train_docs, heldout_docs, heldout, tokenizer, page_ids, chat_ids) -> dict:
    import hashlib

    return {
        "package": demo_corpus.PACKAGE, "version": demo_corpus.package_version(args.corpus),
        "license": "PSF-2.0 (code examples also 0BSD)", "split_seed": args.split_seed,
        "documents": len(docs), "train_documents": len(train_docs), "heldout_documents": [d.name for d in heldout_docs],
        "chars": sum(len(d.text) for d in docs), "train_chars": sum(len(d.text) for d in train_docs),
        "heldout_chars": len(heldout), "heldout_sha256": hashlib.sha256(heldout.encode()).hexdigest(),
        "vocab_size": tokenizer.get_vocab_size(),
        "train_page_tokens": sum(map(len, page_ids)), "chat_pairs": len(chat_ids),
        "train_chat_tokens": sum(map(len, chat_ids)), "heldout_tokens": len(tokenizer.encode(heldout).ids),
    }


# ----------------------------------------------------------------------------- data


class Batches:
    """Fixed-length chunks of the token stream, reshuffled each epoch from (seed, epoch).

    The batch of a step depends only on (seed, step), so resuming needs nothing but the step.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int):
        usable = len(stream) // seq_len * seq_len
        self.chunks = stream[:usable].reshape(-1, seq_len)  # [N, T]
        self.batch_size, self.seed = batch_size, seed
        self._perm_epoch, self._perm = None, None

    def position(self, step: int) -> dict:
        first = step * self.batch_size
        return {"epoch": first // len(self.chunks), "chunk": first % len(self.chunks)}

    def batch(self, step: int) -> np.ndarray:
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        rows = [self._chunk_index(p) for p in positions]
        return self.chunks[rows].astype(np.int64)  # [B, T]

    def _chunk_index(self, position: int) -> int:
        epoch, index = divmod(position, len(self.chunks))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
            self._perm_epoch = epoch
        return int(self._perm[index])


def learning_rate(step: int, args) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- routing balance


class ExpertLoads:
    """Counts, per MoE layer, how many token slots each routed expert received since the last reset.

    A forward hook on each DeepseekV3TopkRouter reads the ``topk_indices`` it returns (the selection
    made with the bias), so the counts are exactly the loads the bias update must balance.
    """

    def __init__(self, model):
        self.routers = _routers(model)
        self.counts = {name: None for name in self.routers}
        self._handles = [r.register_forward_hook(self._hook(name)) for name, r in self.routers.items()]

    def _hook(self, name):
        def record(module, inputs, output):
            import torch

            indices = output[2]  # (router_logits, topk_weights, topk_indices [tokens, k])
            counts = torch.bincount(indices.flatten(), minlength=module.num_experts)
            self.counts[name] = counts if self.counts[name] is None else self.counts[name] + counts

        return record

    def reset(self) -> None:
        self.counts = dict.fromkeys(self.routers)

    def update_biases(self, speed: float) -> None:
        """DeepSeek-V3 §2.1.2: bias_i += γ·sign(mean load − load_i), then counts are cleared."""
        import torch

        with torch.no_grad():
            for name, router in self.routers.items():
                load = self.counts[name].float()
                router.e_score_correction_bias += speed * torch.sign(load.mean() - load)
        self.reset()

    def imbalance(self) -> float:
        """Worst layer's max load / mean load over the counted tokens (1.0 = perfectly balanced)."""
        ratios = [(c.max() / c.float().mean()).item() for c in self.counts.values() if c is not None]
        return max(ratios, default=1.0)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _routers(model) -> dict:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    return {name: m for name, m in model.named_modules() if isinstance(m, DeepseekV3TopkRouter)}


# ----------------------------------------------------------------------------- training


def train(args) -> None:
    """Train one demo model; checkpoint every few minutes; write the bf16 HF directory at the end."""
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    state_path = work / f"train-state-{args.arch}.pt"
    batches = Batches(np.load(work / "train_ids.npy"), args.seq_len, args.batch_size, args.seed)
    tokenizer_vocab = _vocab_size(work / "tokenizer.json")
    model = build_model(args.arch, tokenizer_vocab, args.seq_len, args.seed)
    optimizer = _optimizer(model, args)
    progress = {"step": 0, "elapsed_s": 0.0, "losses": [], "evals": []}
    if args.resume and state_path.is_file():
        progress = _load_state(state_path, model, optimizer)
        _log(f"resumed at step {progress['step']} ({progress['elapsed_s'] / 60:.1f} min so far)")
    loads = ExpertLoads(model)
    model.train()
    _run_steps(model, optimizer, batches, loads, progress, args, state_path)
    loads.remove()
    if progress["step"] >= args.steps:
        _finish(model, progress, args, work)


def _run_steps(model, optimizer, batches, loads, progress, args, state_path) -> None:
    import torch

    last_save = started = time.time()
    elapsed_before = progress["elapsed_s"]
    stop = min(args.steps, args.stop_after or args.steps)
    while progress["step"] < stop:
        step = progress["step"]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        inputs = torch.from_numpy(batches.batch(step))
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        imbalance = loads.imbalance() if loads.routers else None
        if loads.routers:
            loads.update_biases(args.bias_update_speed)
        progress["step"] = step + 1
        progress["losses"].append(round(loss.item(), 6))
        progress["elapsed_s"] = elapsed_before + time.time() - started
        progress["position"] = batches.position(step + 1)
        if progress["step"] % args.log_every == 0:
            _log_step(progress, args, imbalance)
        if args.eval_every and progress["step"] % args.eval_every == 0:
            progress["evals"].append(_quick_eval(model, Path(args.work), args, progress["step"]))
            loads.reset()  # the evaluation's routing must not count towards the next bias update
        if time.time() - last_save > args.checkpoint_minutes * 60 or progress["step"] == stop:
            _save_state(state_path, model, optimizer, progress, args)
            last_save = time.time()


def _optimizer(model, args):
    import torch

    # Decay matrices only: norms and biases keep their scale (the usual GPT-style split).
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def _quick_eval(model, work: Path, args, step: int) -> dict:
    """Held-out perplexity on the first ``eval_tokens`` tokens (a progress signal, not the card number)."""
    import torch
    from tokenizers import Tokenizer

    from dsedge.evaluation import evaluate_perplexity, torch_logits_fn

    ids = Tokenizer.from_file(str(work / "tokenizer.json")).encode(
        (work / "heldout.txt").read_text(encoding="utf-8")).ids[: args.eval_tokens]
    model.eval()
    rng_state = torch.get_rng_state()  # evaluation must not shift the training RNG stream
    report = evaluate_perplexity(torch_logits_fn(model), ids, window=args.seq_len, batch_size=args.batch_size)
    torch.set_rng_state(rng_state)
    model.train()
    _log(f"step {step} held-out ppl {report.perplexity:.2f} top1 {report.top1_accuracy:.3f}")
    return {"step": step, "perplexity": report.perplexity, "top1": report.top1_accuracy, "tokens": report.tokens}


def _log_step(progress: dict, args, imbalance: float | None) -> None:
    recent = progress["losses"][-args.log_every:]
    step, elapsed = progress["step"], progress["elapsed_s"]
    tokens_per_s = step * args.batch_size * args.seq_len / max(elapsed, 1e-9)
    balance = "" if imbalance is None else f"max/mean expert load {imbalance:.2f} "
    _log(f"step {step}/{args.steps} loss {sum(recent) / len(recent):.4f} lr {learning_rate(step - 1, args):.2e} "
         f"{balance}{tokens_per_s:.0f} tok/s {elapsed / 60:.1f} min")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- checkpoints


def _save_state(path: Path, model, optimizer, progress: dict, args) -> None:
    """Model, optimizer, step, RNG and data position, written atomically (temp file + rename)."""
    import torch

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress,
             "torch_rng": torch.get_rng_state(), "args": vars(args)}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    _log(f"saved training state at step {progress['step']} -> {path}")


def _load_state(path: Path, model, optimizer) -> dict:
    import torch

    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["progress"]


def _vocab_size(tokenizer_path: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()


def _finish(model, progress: dict, args, work: Path) -> None:
    summary = {"arch": args.arch, "seed": args.seed, "steps": progress["step"],
               "tokens": progress["step"] * args.batch_size * args.seq_len,
               "wall_time_s": round(progress["elapsed_s"], 1),
               "final_train_loss_mean_last_50": round(float(np.mean(progress["losses"][-50:])), 4),
               "evals": progress["evals"], "command": " ".join(sys.argv), "args": vars(args)}
    (work / f"train-summary-{args.arch}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (work / f"train-losses-{args.arch}.json").write_text(json.dumps(progress["losses"]) + "\n", encoding="utf-8")
    if args.out:
        save_hf_directory(model, work / "tokenizer.json", Path(args.out), args.seq_len)
        _log(f"wrote {args.out}")


def save_hf_directory(model, tokenizer_path: Path, out: Path, max_positions: int) -> None:
    """bf16 weights in HF layout (routers in float32, as transformers 5 and DeepSeek store them),
    tokenizer files and generation_config.json; written into a temporary sibling, then renamed."""
    import shutil

    import torch

    from dsedge.testing.tokenizer import write_tokenizer_files

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = model.to(torch.bfloat16).eval()
    for router in _routers(model).values():
        router.float()  # gate.weight and e_score_correction_bias stay float32 on disk
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp, safe_serialization=True)
    write_tokenizer_files(tmp, tokenizer_path.read_text(encoding="utf-8"), model_max_length=max_positions)
    _write_generation_config(tmp)
    for file in tmp.iterdir():
        file.chmod(0o644)  # save_pretrained writes the weights owner-only
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _write_generation_config(out: Path) -> None:
    import transformers

    from dsedge.testing.tokenizer import BOS_ID, EOS_ID

    # DeepSeek-R1's recommended sampling (generation_config.json of the published model).
    config = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": True, "temperature": 0.6,
              "top_p": 0.95, "transformers_version": transformers.__version__}
    (out / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- command line


def _prepare_tokenizer(existing: str | None, texts: list[str], train_bpe):
    """A fresh BPE, or a shipped model's own tokenizer: BPE training is not reproducible across tokenizers
    releases (the same corpus gave a different vocabulary under a later one), so work that continues a shipped
    model (scripts/train_mtp.py) must tokenize with that model's tokenizer.json."""
    if existing is None:
        return train_bpe(texts, BPE_VOCAB_SIZE)
    from tokenizers import Tokenizer

    return Tokenizer.from_file(existing)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="split the corpus, train the tokenizer, tokenize")
    prep.add_argument("--corpus", required=True, help="where python3.11-doc was extracted (dpkg -x target)")
    prep.add_argument("--work", required=True, help="working directory for data and training state")
    prep.add_argument("--split-seed", type=int, default=0, help="seed of the held-out page hash")
    prep.add_argument("--tokenizer", help="tokenize with this tokenizer.json instead of training one "
                      "(to continue a shipped demo model, e.g. for scripts/train_mtp.py)")
    run = commands.add_parser("train", help="train one model (run `prepare` first)")
    run.add_argument("--arch", choices=ARCHES, required=True)
    run.add_argument("--work", required=True)
    run.add_argument("--out", help="HF model directory written at the end (replaced if present)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--steps", type=int, default=1400)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--seq-len", type=int, default=512, help="also the saved max_position_embeddings")
    run.add_argument("--lr", type=float, default=1.5e-3)
    run.add_argument("--min-lr-ratio", type=float, default=0.1)
    run.add_argument("--warmup", type=int, default=100)
    run.add_argument("--weight-decay", type=float, default=0.1)
    run.add_argument("--clip", type=float, default=1.0)
    # V3 used γ = 0.001 over ~14.3T tokens; in a 1,400-step run the router's own weights move much faster
    # than 0.001 per step, and with it the whole MoE collapsed onto 2 of 12 experts for >120 steps
    # (max/mean load 5.6 at step 120); γ = 0.01 had it at 1.5 by step 100.
    run.add_argument("--bias-update-speed", type=float, default=1e-2, help="γ of the V3 bias update")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--checkpoint-minutes", type=float, default=5.0)
    run.add_argument("--resume", action="store_true", help="continue from --work's training state")
    run.add_argument("--stop-after", type=int, help="stop (after checkpointing) at this step; for tests")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--eval-every", type=int, default=200, help="quick held-out eval (0: never)")
    run.add_argument("--eval-tokens", type=int, default=16384)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    # Idle OpenMP threads sleep instead of spinning: when another multi-threaded process shares the
    # two cores, spinning threads stall each other (measured: 390-850 tok/s instead of ~1,600). It
    # changes scheduling only, never results. Must be set before torch loads its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    prepare(args) if args.command == "prepare" else train(args)


if __name__ == "__main__":
    main()
