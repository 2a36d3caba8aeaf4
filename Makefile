# make test   — create .venv, install fusedvae with its extras, lint (ruff), run the tests (CPU: kernels via Triton's interpreter)
# make bench  — the same environment, then the benchmark suite on the best device present
# make lint   — ruff (pycodestyle, pyflakes, import order, bugbear; settings in pyproject.toml)
# make gpu-dry-run — scripts/gpu_run.sh --dry-run: every step of the GPU run, tiny, on the CPU
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test bench parity lint gpu-dry-run clean venv

venv: $(STAMP)

# A torch already importable by $(PYTHON) (a GPU image's, say) is reused through system site-packages;
# otherwise torch is installed first, pinned, so no dependency drags in a CUDA build.
$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "reusing torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install -q -e ".[test,bench]"
	@touch $(STAMP)

test: lint
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
		$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m bench run --suite all

parity: $(STAMP)
	$(PY) -m fusedvae.parity

lint: $(STAMP)
	$(PY) -m ruff check .

gpu-dry-run: $(STAMP)
	PYTHON=$(PY) OUT=$${OUT-/tmp/fusedvae-gpu-dry-run} bash scripts/gpu_run.sh --dry-run

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
