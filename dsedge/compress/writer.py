"""Writing a checkpoint directory as it is produced: safetensors shards flushed as they fill, then the index.

Output goes through ``dsedge.staging.staged_output`` (a temporary sibling renamed in when complete, a lock,
inputs protected; DESIGN.md §2), so an interrupted or failed compress leaves no output directory behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dsedge.staging import Artifact, check_output, has_file, staged_output

DEFAULT_MAX_SHARD_BYTES = 1 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")


# What `--overwrite` may replace: a directory an earlier `dsedge compress` wrote (never an original checkpoint).
COMPRESSED_CHECKPOINT = Artifact("compressed checkpoint (config.json + compress_report.json)",
                                 has_file("config.json", "compress_report.json"))


def compressed_output(output: Path, *, source: Path, overwrite: bool):
    """The staged output of `dsedge compress` (dsedge.staging): refuses writing onto or around the input."""
    return staged_output(output, inputs=[source], overwrite=overwrite, artifact=COMPRESSED_CHECKPOINT)


def check_compressed_output(output: Path, *, source: Path, overwrite: bool) -> None:
    """The same refusals as :func:`compressed_output`, before any work is done."""
    check_output(output, inputs=[source], overwrite=overwrite, artifact=COMPRESSED_CHECKPOINT)


class ShardWriter:
    """Collects tensors and writes a shard whenever ``max_shard_bytes`` are buffered; memory stays one shard."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict = {}
        self._buffered = 0
        self._shards: list[list[str]] = []
        self.bytes_written = 0

    def add(self, tensors: dict) -> None:
        for name, tensor in tensors.items():
            if name in self._buffer or any(name in s for s in self._shards):
                raise AssertionError(f"tensor {name} written twice")
            self._buffer[name] = tensor.contiguous()
            self._buffered += tensor.numel() * tensor.element_size()

    def flush_if_full(self) -> None:
        if self._buffered >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        save_file(self._buffer, str(self._part(len(self._shards))), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self.bytes_written += self._buffered
        self._buffer, self._buffered = {}, 0

    def finish(self) -> list[Path]:
        """Flush, name the shards ``model-0000i-of-0000N.safetensors`` (or ``model.safetensors``), write the index."""
        self.flush()
        count = len(self._shards)
        if count == 1:
            final = [self.directory / "model.safetensors"]
        else:
            final = [self.directory / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for i, path in enumerate(final):
            self._part(i).rename(path)
        if count > 1:
            weight_map = {n: final[i].name for i, names in enumerate(self._shards) for n in names}
            index = {"metadata": {"total_size": self.bytes_written}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.directory / "model.safetensors.index.json", index)
        return final

    def _part(self, i: int) -> Path:
        return self.directory / f"part-{i:05d}.safetensors"


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
