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

# `make wheel`: tokedge's sdist and wheel (PEP 517) plus the wheels of its base dependencies for
# this machine, all in dist/, so that `pip install --no-index dist/*.whl` works offline.
# `make device-wheels`: the same for a JetPack 6 device (aarch64, Python 3.10, pinned by
# constraints/jetpack6.txt), in dist/jetpack6/; copy that folder to the device (docs/device.md).
DIST ?= dist
DEVICE_DIST ?= $(DIST)/jetpack6

.PHONY: demo test typecheck install lint clean wheel device-wheels

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

wheel: $(STAMP)
	rm -rf $(DIST) build
	$(PY) -m build --no-isolation --sdist --wheel --outdir $(DIST) .
	$(PY) -m pip download --quiet --only-binary=:all: --dest $(DIST) $(DIST)/tokedge-*.whl

device-wheels: wheel
	mkdir -p $(DEVICE_DIST)
	cp $(DIST)/tokedge-*.whl $(DEVICE_DIST)/
	# PyPI's onnxruntime is the CPU build; for the GPU providers the device swaps in NVIDIA's
	# onnxruntime-gpu (docs/device.md)
	$(PY) -m pip download --quiet --only-binary=:all: --platform manylinux2014_aarch64 --python-version 3.10 \
		--implementation cp --constraint constraints/jetpack6.txt --dest $(DEVICE_DIST) \
		$$(grep -v -e '^#' -e '^$$' constraints/jetpack6.txt | cut -d= -f1 | tr '\n' ' ')

clean:
	rm -rf $(DEMO_OUT) .pytest_cache $(DIST) build
