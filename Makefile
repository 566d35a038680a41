# Quickstart targets. Each creates the virtual environment (.venv) when missing and installs what it needs.
#   make app    - the analysis app on the embedded demo run, on http://127.0.0.1:8501 only
#                 (make app ADDRESS=0.0.0.0 serves it on the network: anyone who reaches it can train)
#   make test   - the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: app test install demo gpu-pack clean-venv

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -r requirements.txt
	@# bytecode on both cores (pip compiles on one: 1.5 min of a fresh install; 1 min this way). Like pip, a file
	@# that does not compile (test data of some packages) is skipped.
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20

ADDRESS ?= 127.0.0.1

app: $(STAMP)
	$(BIN)/python -m app --server.address $(ADDRESS)

# Rebuild the demo run shipped in assets/ (synthetic data, frozen profile).
demo: $(STAMP)
	$(BIN)/cmg demo --out assets/demo_run

# The packed UCM file a GPU session carries (bench/gpu_paper.sh); derived from ../shared/data, never committed.
gpu-pack: $(STAMP)
	$(BIN)/cmg data pack ucm_captions --root ../shared/data/ucm_captions --size 32 \
		--out packed/ucm_captions_32.npz --trunk-config configs/ucm_captions_paper.yaml
	$(BIN)/python bench/gpu_text_cache.py --packed packed/ucm_captions_32.npz --out packed/text_cache

clean-venv:
	rm -rf $(VENV)
