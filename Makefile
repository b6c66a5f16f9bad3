# One entry point for people and CI. `make test` builds .venv from scratch when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean

install: $(STAMP)

# constraints.txt pins torch to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
# kernels/ is dsedge-kernels (onnxruntime custom ops, built here with the C compiler for this CPU): the runtime
# uses it where it is installed and the CPU has AVX-512 VNNI, and onnxruntime's own ops everywhere else.
$(STAMP): pyproject.toml constraints.txt kernels/pyproject.toml kernels/setup.py kernels/src/vnni_ops.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q ./kernels
	touch $(STAMP)

test: install
	$(BIN)/ruff check dsedge tests benchmarks scripts
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" -x

# The main job on the shipped demo model (DeepSeek-V3 architecture, trained on the Python docs):
# compress (routed experts int4, the rest int8) -> partitioned bundle for the x86 CPU target -> generate -> profile,
# then an HNSW index over this project's docs and an answer from retrieved, numbered sources. Sampling is the
# demo model's own generation_config (temperature 0.6, top_p 0.95, repetition penalty 1.1); add --greedy
# to a run for the same text every time.
DEMO_TARGET := x86-cpu-16g
demo: install
	$(BIN)/dsedge compress deepseek-v3-tiny -o demo.ckpt --recipe int4-experts --overwrite
	$(BIN)/dsedge export demo.ckpt -o demo.bundle --layout partitioned --target $(DEMO_TARGET) --overwrite
	$(BIN)/dsedge run demo.bundle --target $(DEMO_TARGET) --prompt "The json module" --max-new-tokens 60
	$(BIN)/dsedge profile demo.bundle --target $(DEMO_TARGET) --trials 2
	$(BIN)/dsedge index build README.md docs dsedge/demo/MODEL_CARD.md -o demo.index --overwrite
	$(BIN)/dsedge index query demo.index "What text was the demo model trained on?" -k 3
	$(BIN)/dsedge run demo.bundle --target $(DEMO_TARGET) --index demo.index --show-sources --max-new-tokens 60 \
		--prompt "What text was the demo model trained on?"

lint: install
	$(BIN)/ruff check dsedge tests benchmarks scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache demo.ckpt demo.bundle demo.index
