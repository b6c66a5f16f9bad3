"""Build dsedge's built-in calibration text (dsedge/compress/data/calibration.txt) from python3.11-doc.

Same source and cleaning as the demo corpus (``scripts/demo_corpus.py``; get the pages as its docstring
says). We take whole pages from the demo models' *training* split only, never a page of the demo held-out
text (``dsedge/demo/data/heldout.txt``), so a compressed demo model's quality measured on that held-out text
is not inflated by calibration. Pages are taken in the order of sha256("calib:" + page path) until
``TARGET_CHARS`` characters.

    python scripts/calib_corpus.py /tmp/pydoc
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus  # noqa: E402

TARGET_CHARS = 320_000
OUT = Path(__file__).resolve().parents[1] / "dsedge" / "compress" / "data" / "calibration.txt"


def main(corpus_root: str) -> None:
    docs = demo_corpus.read_documents(corpus_root)
    train, heldout = demo_corpus.split_documents(docs, seed=0)  # the demo models' split
    order = sorted(train, key=lambda d: hashlib.sha256(f"calib:{d.name}".encode()).hexdigest())
    chosen, chars = [], 0
    for doc in order:
        if chars >= TARGET_CHARS:
            break
        chosen.append(doc)
        chars += len(doc.text)
    text = demo_corpus.DOC_SEPARATOR.join(d.text.strip() for d in chosen) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"{len(chosen)} pages, {len(text)} characters -> {OUT}")
    print("pages: " + ", ".join(d.name.removesuffix(".rst.txt") for d in chosen))
    print(f"held-out pages excluded: {len(heldout)}; sha256 {hashlib.sha256(text.encode()).hexdigest()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/pydoc")
