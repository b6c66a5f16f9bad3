"""Train a DeepSeek-V3 MTP module (depth 1) on a frozen demo model, and add it to the model directory.

Why the frozen model and not a retrain with the joint loss: DeepSeek-V3 trains the main model and the MTP
module together (technical report §2.2: L = L_main + λ·L_MTP, λ = 0.3 then 0.1), which also helps the main
model; retraining ``deepseek-v3-tiny`` that way would change every number its model card and the benchmarks
report. With the main model frozen, λ only scales the learning rate, so the loss is the MTP cross-entropy
alone: at position i the module reads the main model's final (normed) hidden state h_i and the embedding of
t_{i+1} and predicts t_{i+2}. The embedding and output head are the main model's, frozen (the module shares
them); the module's enorm, hnorm, eh_proj, decoder layer (MLA + its own MoE; its router's selection bias stays
at zero: no balancing update, unlike train_demo.py) and shared_head.norm are trained. Each step still runs
the frozen main model forward (no backward through it).

``--target distill`` trains toward the frozen main model's own distribution for t_{i+2} (its logits at i + 1)
instead of the text's token: what greedy speculative decoding accepts (``step_loss``). ``--init`` goes on from
the module a model directory ships; ``--reinit-routed`` re-draws its router and routed experts.

Acceptance on the held-out text (teacher-forced, greedy, k = 1): the share of positions where the module's
argmax at i equals the main model's argmax at i + 1 — what greedy speculative decoding accepts.

    # after `scripts/train_demo.py prepare --work /tmp/demo-work` (see that script)
    nice -n 19 python scripts/train_mtp.py --model dsedge/demo/models/deepseek-v3-tiny --work /tmp/demo-work \
        --out /tmp/deepseek-v3-tiny-mtp [--steps 600]
    python benchmarks/speculative_bench.py decode --bundle <export of --out> --mode mtp
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding

sys.path.insert(0, str(Path(__file__).parent))
from train_demo import Batches, learning_rate  # noqa: E402 — sibling script: the same data order and schedule

from dsedge.models.reference import on_disk_state_dict  # noqa: E402


class RMSNorm(torch.nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.ones(width)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class MTPModule(torch.nn.Module):
    """The module's own parameters under checkpoint names (``model.layers.{L}.`` + these)."""

    def __init__(self, config):
        super().__init__()
        width, eps = config.hidden_size, config.rms_norm_eps
        self.enorm, self.hnorm = RMSNorm(width, eps), RMSNorm(width, eps)
        self.eh_proj = torch.nn.Linear(2 * width, width, bias=False)
        self.block = DeepseekV3DecoderLayer(config, layer_idx=config.num_hidden_layers)
        self.head_norm = RMSNorm(width, eps)
        self.rotary = DeepseekV3RotaryEmbedding(config)
        self.init_routed(config.initializer_range)

    def init_routed(self, std: float) -> None:
        """The router and routed experts drawn as transformers' DeepseekV3PreTrainedModel._init_weights draws
        them. A bare DeepseekV3DecoderLayer leaves the router at zeros and the fused experts as torch.empty,
        and with zero gate/up rows an expert's output and every gradient into it stay zero: the module shipped
        before 2026-12-07 had been trained that way, with only its shared expert live."""
        mlp = self.block.mlp
        if hasattr(mlp, "experts"):
            torch.nn.init.normal_(mlp.gate.weight, std=std)
            torch.nn.init.normal_(mlp.experts.gate_up_proj, std=std)
            torch.nn.init.normal_(mlp.experts.down_proj, std=std)

    def forward(self, embed, hidden, positions):
        x = self.eh_proj(torch.cat([self.enorm(embed), self.hnorm(hidden)], -1))
        length = x.shape[1]
        causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
        out = self.block(x, attention_mask=causal, position_ids=positions,
                         position_embeddings=self.rotary(x, positions))
        return self.head_norm(out[0] if isinstance(out, tuple) else out)

    def checkpoint_tensors(self, layer: int, embed: torch.Tensor, head: torch.Tensor) -> dict:
        p = f"model.layers.{layer}."
        # per-expert names, as checkpoints store them (the name pattern needs a parent: wrap the block)
        block = on_disk_state_dict(torch.nn.ModuleDict({"block": self.block}))
        tensors = {p + k.removeprefix("block."): v for k, v in block.items()}
        tensors |= {p + "enorm.weight": self.enorm.weight, p + "hnorm.weight": self.hnorm.weight,
                    p + "eh_proj.weight": self.eh_proj.weight, p + "shared_head.norm.weight": self.head_norm.weight,
                    p + "embed_tokens.weight": embed, p + "shared_head.head.weight": head}
        return {k: v.detach().to(torch.float32 if "gate" in k and "proj" not in k else torch.bfloat16).contiguous()
                for k, v in tensors.items()}

    def load_checkpoint_tensors(self, weights: dict, layer: int) -> None:
        """The inverse of ``checkpoint_tensors``: this module's parameters from a checkpoint's layer ``layer``
        (``--init``: go on training the module a model directory already ships)."""
        from dsedge.models.experts import fuse_experts

        p = f"model.layers.{layer}."
        own = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
               "shared_head.norm.weight": "head_norm.weight"}
        shared = ("embed_tokens.weight", "shared_head.head.weight")  # the main model's, frozen: not loaded
        state = {}
        for name, tensor in weights.items():
            if not name.startswith(p) or name.removeprefix(p) in shared:
                continue
            key = name.removeprefix(p)
            state[own.get(key, "block." + key)] = tensor.to(torch.float32)
        missing, unexpected = self.load_state_dict(fuse_experts(state), strict=False)
        missing = [k for k in missing if not k.startswith("rotary.")]
        if missing or unexpected:
            raise SystemExit(f"--init: layer {layer} does not fit the module: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


def main_outputs(model, ids: torch.Tensor):
    """The frozen main model's final normed hidden state and its logits."""
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        return hidden, model.lm_head(hidden)


def mtp_logits(module, model, ids, hidden):
    """Logits for t_{i+2} at positions 0 .. T-2 (the last position has no t_{i+1})."""
    embed = model.model.embed_tokens(ids[:, 1:])
    positions = torch.arange(ids.shape[1] - 1)[None].expand(ids.shape[0], -1)
    return model.lm_head(module(embed, hidden[:, :-1], positions))


def step_loss(args, logits: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``data``: cross-entropy against the text's t_{i+2} (positions 0 .. T-3). ``distill``: cross-entropy
    against the frozen main model's own distribution for t_{i+2} (its logits at i + 1, positions 0 .. T-2),
    i.e. KL(main || module) plus a constant. Greedy speculative decoding accepts a draft when it is the main
    model's argmax, not the text's next token, so the main model's distribution is the target that
    acceptance rewards (the self-distillation of Medusa-2, Cai et al. 2024, and of EAGLE's data).
    """
    if args.target == "data":
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))
    target = torch.softmax(teacher[:, 1:], -1)
    return -(target * torch.log_softmax(logits, -1)).sum(-1).mean()


def acceptance(module, model, ids: np.ndarray, window: int) -> float:
    """Greedy k=1 acceptance, teacher-forced on ``ids`` in windows: MTP argmax at i == main argmax at i+1."""
    module.eval()
    hits = total = 0
    with torch.no_grad():
        for start in range(0, len(ids) - window, window):
            chunk = torch.from_numpy(ids[start:start + window].astype(np.int64))[None]
            hidden, logits = main_outputs(model, chunk)
            drafted = mtp_logits(module, model, chunk, hidden).argmax(-1)[0]  # t_{i+2} drafted at i = 0 .. T-2
            target = logits.argmax(-1)[0, 1:]  # the main model's greedy t_{i+2}: position i+1's argmax
            hits += int((drafted == target).sum())
            total += drafted.shape[0]
    module.train()
    return hits / max(total, 1)


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    model.requires_grad_(False)
    config = model.config
    config._attn_implementation = "eager"
    module = MTPModule(config)
    if args.init:
        module.load_checkpoint_tensors(load_file(str(Path(args.model) / "model.safetensors")),
                                       config.num_hidden_layers)
        if args.reinit_routed:
            module.init_routed(config.initializer_range)
    heldout_ids = np.asarray(_tokenize(Path(args.model), Path(args.heldout))[: args.eval_tokens])
    initial = acceptance(module, model, heldout_ids, args.seq_len) if args.init else None
    if initial is not None:
        print(f"held-out acceptance before training: {initial:.4f}", file=sys.stderr, flush=True)
    batches = Batches(np.load(Path(args.work) / "train_ids.npy"), args.seq_len, args.batch_size, args.seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    args.warmup, args.min_lr_ratio = min(args.warmup, args.steps // 10 or 1), 0.1
    losses, started = [], time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        ids = torch.from_numpy(batches.batch(step))
        hidden, teacher = main_outputs(model, ids)
        loss = step_loss(args, mtp_logits(module, model, ids, hidden), ids, teacher)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
        if (step + 1) % args.log_every == 0:
            print(f"step {step + 1}/{args.steps} mtp loss {np.mean(losses[-args.log_every:]):.4f} "
                  f"({(time.time() - started) / 60:.1f} min)", file=sys.stderr, flush=True)
    accepted = acceptance(module, model, heldout_ids, args.seq_len)
    _write(args, model, module)
    summary = {"steps": args.steps, "target": args.target, "init": args.init, "reinit_routed": args.reinit_routed,
               "heldout_acceptance_before": initial, "final_loss_mean_last_50": float(np.mean(losses[-50:])),
               "heldout_acceptance_greedy_k1": accepted, "heldout_tokens": int(len(heldout_ids)),
               "wall_time_s": round(time.time() - started, 1), "perplexity_of_mtp_loss": math.exp(losses[-1])}
    print(json.dumps(summary, indent=2))
    return summary


def _tokenize(model_dir: Path, text_path: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text_path.read_text(encoding="utf-8")).ids


def _write(args, model, module) -> None:
    """A copy of the model directory with the module at layer num_hidden_layers and the config saying so."""
    out, src = Path(args.out), Path(args.model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    weights = load_file(str(tmp / "model.safetensors"))
    layer = model.config.num_hidden_layers
    weights |= module.checkpoint_tensors(layer, model.model.embed_tokens.weight, model.lm_head.weight)
    if args.without_shared_copies:  # the demo ships none: dsedge's reader takes the main model's own
        for name in ("embed_tokens.weight", "shared_head.head.weight"):
            weights.pop(f"model.layers.{layer}.{name}")
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the frozen DeepSeek-V3 model directory")
    parser.add_argument("--work", required=True, help="`train_demo.py prepare` output (train_ids.npy)")
    parser.add_argument("--out", required=True, help="model directory to write: --model plus the MTP module")
    parser.add_argument("--heldout", default=str(Path(__file__).parents[1] / "dsedge/demo/data/heldout.txt"))
    parser.add_argument("--target", choices=["data", "distill"], default="data",
                        help="what the module learns to predict: the text's t+2 (data) or the main model's "
                             "distribution for it (distill)")
    parser.add_argument("--init", action="store_true",
                        help="start from the MTP module --model already ships instead of a fresh one")
    parser.add_argument("--reinit-routed", action="store_true",
                        help="with --init: draw the router and routed experts afresh (a module trained with them "
                             "at zero never moved them)")
    parser.add_argument("--without-shared-copies", action="store_true",
                        help="leave out the module's copies of the embedding and head (V3 stores them; "
                             "dsedge reads the main model's)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
