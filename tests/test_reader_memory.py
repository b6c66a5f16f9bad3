"""The reader streams: reading a multi-shard checkpoint layer by layer keeps peak RSS near one layer."""

import subprocess
import sys

from dsedge.testing.synthetic import write_sharded_dense

# Current RSS (anonymous + file-backed pages) sampled while each layer is held: a memory-mapped reader
# would accumulate the shards' pages here, a streaming one holds about one layer.
MEASURE = """
import sys
from dsedge.models.checkpoint import Checkpoint
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
ckpt = Checkpoint(sys.argv[1])
ckpt.validate()
ckpt.read("model.norm.weight")  # import torch and warm up before the baseline
base, peak, largest = rss(), 0, 0
for layer, tensors in ckpt.iter_layers():
    largest = max(largest, sum(t.numel() * t.element_size() for t in tensors.values()))
    peak = max(peak, rss())
    del tensors
for name in ckpt.non_layer_names():
    tensor = ckpt.read(name)
    peak = max(peak, rss())
    del tensor
print(peak - base, largest)
"""


def test_peak_rss_follows_one_layer_not_the_model(tmp_path):
    total = write_sharded_dense(tmp_path, shards=4)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, check=True)
    growth, largest_layer = (int(x) for x in out.stdout.split())
    # ~380 MB model in 4 shards of ~95 MB; one layer is ~45 MB.
    assert largest_layer * 0.9 < growth < largest_layer * 1.6, (growth, largest_layer)
    assert growth < total / 4
