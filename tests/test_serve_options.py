"""`dsedge serve` options and per-generation accounting: --verify (full sha256 verification before serving),
the model's generation defaults (repetition penalty included, per row of a batch), speculative counters per
generation."""

import json
import shutil
from pathlib import Path

import pytest

from dsedge import verified
from dsedge.cli import main
from dsedge.export.bundle import export_bundle
from dsedge.serve import Backend


@pytest.fixture(scope="module")
def plain_bundle(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-options")
    return Path(export_bundle(tiny_checkpoint("v2_lite"), root / "plain.bundle", max_context=256,
                              validate=False).output)


# --- --verify ------------------------------------------------------------------------------------

@pytest.fixture
def hash_calls(monkeypatch):
    calls: list[str] = []
    real = verified.sha256_file

    def counting(path):
        calls.append(Path(path).as_posix())
        return real(path)

    monkeypatch.setattr(verified, "sha256_file", counting)
    return calls


def _listed_files(bundle: Path) -> list[str]:
    return sorted(json.loads((bundle / "manifest.json").read_text())["files"])


def test_serve_verify_hashes_every_file_before_serving(plain_bundle, tmp_path, hash_calls):
    bundle = Path(shutil.copytree(plain_bundle, tmp_path / "b"))
    Backend.open(bundle)  # fast start: records what it hashed
    hash_calls.clear()
    Backend.open(bundle)
    assert len(hash_calls) < len(_listed_files(bundle))  # the record vouches: not every file hashed again
    hash_calls.clear()
    Backend.open(bundle, verify=True)
    assert len(hash_calls) == len(_listed_files(bundle))


def test_serve_verify_refuses_a_changed_file_before_it_listens(plain_bundle, tmp_path, capsys):
    bundle = Path(shutil.copytree(plain_bundle, tmp_path / "b"))
    Backend.open(bundle)
    # A file the server only reads at the first chat request: without --verify the start succeeds.
    config = bundle / "tokenizer" / "tokenizer_config.json"
    raw = bytearray(config.read_bytes())
    at = raw.rindex(b"}")  # the whitespace before the last brace changes: still JSON, another sha256
    raw[at - 1:at] = b" " if raw[at - 1:at] != b" " else b"\n"
    config.write_bytes(bytes(raw))
    Backend.open(bundle)  # fast start: nothing opened the changed file yet
    code = main(["serve", str(bundle), "--port", "0", "--verify"])
    err = capsys.readouterr().err
    assert code == main(["run", str(bundle), "-p", "x", "-n", "1", "--verify"]) != 0
    assert code in (3, 4) and "sha256" in err and "tokenizer_config.json" in err, err
