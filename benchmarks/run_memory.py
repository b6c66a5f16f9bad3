"""plan's run RSS estimate against a real `dsedge run`, and where a run's memory goes (issue 13).

For each bundle: `dsedge run` on a short prompt in a fresh process, its VmHWM (not ru_maxrss, which Linux
carries over from the forked parent), and the process's RSS split after imports / after load / after
decode (anonymous vs file-backed); next to plan's estimate for the model's published shape (scale_bench's
configs) at the bundle's context. Memory, not time: it may run beside other work.

    .venv/bin/python benchmarks/run_memory.py \\
        r1-distill-qwen-1.5b:int4:/work/scale/r1-distill-qwen-1.5b-int4.bundle \\
        r1-distill-qwen-1.5b:int8:/work/scale/r1-distill-qwen-1.5b-int8.bundle \\
        v2-lite@8:int4:/work/scale/v2-lite-int4.bundle
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # sibling scripts: scale_bench (the published shapes)

PROBE = """
import json, sys
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
import numpy, onnxruntime, tokenizers
stages = {"imports": status()}
from dsedge.runtime import load_bundle
engine = load_bundle(sys.argv[1], target="auto")
stages["loaded"] = status()
engine.generate("The json module", max_new_tokens=16, temperature=0.0)
stages["decoded"] = status()
print(json.dumps(stages))
"""


def measure(bundle: str) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE, bundle], check=True, capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def planned(model: str, recipe: str, bundle: Path) -> int:
    from scale_bench import CONFIGS, hf_config

    from dsedge.planning import plan

    name, _, layers = model.partition("@")
    manifest = json.loads((bundle / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config(name, int(layers) if layers else None, False,
                                                                    CONFIGS)))
        rows = plan(Path(tmp) / "config.json", context=manifest["max_context"], layout=manifest["layout"])
    return {r.scheme: r for r in rows.precisions}[recipe].runtime_rss_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", help="MODEL[@LAYERS]:RECIPE:BUNDLE")
    args = parser.parse_args()
    mib = 2**20
    print("| model | recipe | plan run RSS | measured peak (VmHWM) | error | anon / file after load |")
    print("|---|---|---|---|---|---|")
    for cell in args.cells:
        model, recipe, bundle = cell.split(":", 2)
        stages, estimate = measure(bundle), planned(model, recipe, Path(bundle))
        peak = stages["decoded"]["VmHWM"]
        loaded = stages["loaded"]
        print(f"| {model} | {recipe} | {estimate / mib:.0f} MiB | {peak / mib:.0f} MiB | {estimate / peak - 1:+.1%} "
              f"| {loaded['RssAnon'] / mib:.0f} / {loaded['RssFile'] / mib:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
