"""Peak RSS of streaming a sharded checkpoint: dsedge's positioned reads vs safetensors' memory map.

    .venv/bin/python benchmarks/reader_memory.py [--layers 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsedge.testing.synthetic import write_sharded_dense

# Current RSS (file-backed mapped pages included) sampled while each layer is held and touched.
RSS = "def rss():\n    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"

DSEDGE = RSS + """
import sys, time
from dsedge.models.checkpoint import Checkpoint
ckpt = Checkpoint(sys.argv[1]); ckpt.read("model.norm.weight")
base, peak, t = rss(), 0, time.perf_counter()
for layer, tensors in ckpt.iter_layers():
    sum(float(x.sum()) for x in tensors.values()); peak = max(peak, rss())
    del tensors
print(peak - base, time.perf_counter() - t)
"""

MMAP = RSS + """
import json, sys, time
from pathlib import Path
from safetensors import safe_open
import torch
root = Path(sys.argv[1]); weight_map = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
handles = {f: safe_open(str(root / f), "pt") for f in set(weight_map.values())}
base, peak, t = rss(), 0, time.perf_counter()
layers = sorted({int(n.split(".")[2]) for n in weight_map if n.startswith("model.layers.")})
for i in layers:
    tensors = {n: handles[f].get_tensor(n) for n, f in weight_map.items() if n.startswith(f"model.layers.{i}.")}
    sum(float(x.sum()) for x in tensors.values()); peak = max(peak, rss())
    del tensors
print(peak - base, time.perf_counter() - t)
"""


def measure(code: str, path: Path) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    growth, seconds = out.stdout.split()
    return int(growth), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        total = write_sharded_dense(Path(tmp), layers=args.layers, shards=8)
        print(f"wrote {total / 1e9:.2f} GB in 8 shards in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        results = {name: measure(code, Path(tmp)) for name, code in (("dsedge", DSEDGE), ("safetensors-mmap", MMAP))}
    layer_bytes = (total - 2 * 4096 * 1024 * 4) / args.layers
    print(f"{'reader':18s} {'peak RSS growth':>16s} {'x one layer':>12s} {'GB/s':>6s}")
    for name, (growth, seconds) in results.items():
        print(f"{name:18s} {growth / 1e6:13.1f} MB {growth / layer_bytes:12.2f} {total / seconds / 1e9:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model_bytes": total, "layer_bytes": layer_bytes, "results": results}))


if __name__ == "__main__":
    main()
