# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install
# what they need. TORCH_SPEC pins the CPU build of torch that this workstation has on disk; a GPU
# user installs their CUDA torch build into .venv first and runs `make ... TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.tokedge-installed
DEMO_OUT ?= demo-out
PYTEST_WORKERS ?= auto

.PHONY: demo test typecheck install lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[export,report,serve,video,dev]"
	# type stubs for the TensorRT path; --no-deps because their dependencies live on NVIDIA's index
	$(PY) -m pip install --quiet --no-deps "tensorrt-stubs>=10.3"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m tokedge.demo --out $(DEMO_OUT)

test: $(STAMP) typecheck
	# one worker per core, whole files per worker (module fixtures export once); PYTEST_WORKERS=0 runs in-process
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile

# pyright checks the TensorRT modules against tensorrt-stubs (mypy cannot parse those stubs)
typecheck: $(STAMP)
	$(VENV)/bin/pyright --pythonpath $(PY)

lint: $(STAMP)
	$(PY) -m ruff check tokedge tests

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
