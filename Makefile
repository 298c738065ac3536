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
PYTEST_DURATIONS ?= 25
# The preprocessing stage (`make test-preprocess`, part of `make test`): a second venv with torchvision,
# where transformers' image processors take their torchvision backend (what a GPU user gets) and its
# video processors construct; tests/preprocess/ compares tokedge's numpy preprocessing with both
# backends there (in .venv those tests skip: no torchvision). TV_TORCH_SPEC is the CUDA build of
# torch that runs on the CPU (~5.5 GB); a GPU user may pass their own pins.
TV_VENV ?= .venv-tv
TV_PY := $(TV_VENV)/bin/python
TV_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TV_STAMP := $(TV_VENV)/.tokedge-installed

# lmms-eval for tests/eval (its scoring functions, and its command line running the `tokedge` model and
# its `openai` model against `tokedge serve`, checked against `tokedge eval`; docs/eval.md). --no-deps:
# lmms-eval 0.7.3 requires torchvision, wandb, opencv and more, and pip would replace this venv's torch and
# transformers pins; these are the packages its task utils, registry, evaluator and command line need
# (pytablewriter: its result table; python-dotenv: its openai model), at the versions tested. filelock 3.x:
# lmms-eval 0.7.3 patches filelock._api, which filelock 4 removed. Without them those tests skip.
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3 loguru==0.7.3 pytz==2026.6 datasets==5.2.0 dill==0.4.1 xxhash==4.1.0 \
	multiprocess==0.70.19 pandas==3.1.1 pyarrow==26.0.1 tenacity==9.2.1 evaluate==0.4.6 sacrebleu==2.6.0 \
	portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.2.1 aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 \
	propcache==0.5.4 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0 \
	filelock==3.32.7 pytablewriter==1.2.1 DataProperty==1.1.1 chardet==6.0.0.post1 mbstrdecoder==1.1.5 \
	pathvalidate==3.3.1 python-dateutil==2.9.0.post0 six==1.17.0 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 \
	python-dotenv==1.2.1

# `make wheel`: tokedge's sdist and wheel (PEP 517) plus the wheels of its base dependencies for
# this machine, all in dist/, so that `pip install --no-index dist/*.whl` works offline.
# `make device-wheels`: the same for a JetPack 6 device (aarch64, Python 3.10, pinned by
# constraints/jetpack6.txt), in dist/jetpack6/; copy that folder to the device (docs/device.md).
DIST ?= dist
DEVICE_DIST ?= $(DIST)/jetpack6

.PHONY: demo test test-preprocess typecheck install install-tv lint clean wheel device-wheels lmms-eval

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[export,report,serve,video,dev]"
	# type stubs for the TensorRT path; --no-deps because their dependencies live on NVIDIA's index
	$(PY) -m pip install --quiet --no-deps "tensorrt-stubs>=10.3"
	# lmms-eval and what importing it needs, without its own dependency pins (LMMS_EVAL_SPEC above)
	$(PY) -m pip install --quiet --no-deps --no-compile $(LMMS_EVAL_SPEC)
	touch $(STAMP)

install: $(STAMP)

lmms-eval: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --no-compile $(LMMS_EVAL_SPEC)

$(TV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TV_VENV)
	$(TV_PY) -m pip install --quiet --upgrade pip
	# --no-compile: no .pyc for torch's thousands of modules at install (the tests import a few)
	$(TV_PY) -m pip install --quiet --no-compile $(TV_TORCH_SPEC)
	$(TV_PY) -m pip install --quiet -e ".[export,video,dev]"
	touch $(TV_STAMP)

install-tv: $(TV_STAMP)

demo: $(STAMP)
	$(PY) -m tokedge.demo --out $(DEMO_OUT)

# The tests start many Python processes (the CLI as a user runs it, servers, Ray workers, lmms-eval): each
# one compiles every module it imports unless bytecode caches can be written, ~2-7 s a process (torch alone
# 2 s). An environment may set PYTHONDONTWRITEBYTECODE (this workstation's does); the test run unsets it.
test: export PYTHONDONTWRITEBYTECODE :=
test: $(STAMP) typecheck
	# one worker per core, whole files per worker (module fixtures export once); PYTEST_WORKERS=0 runs in-process.
	# The preprocessing stage (its own venv: ~4 min, mostly unpacking torch) runs beside the main suite,
	# filling the cores' idle time; its output is printed when both are done, and either failing fails.
	( $(MAKE) -s test-preprocess > .test-preprocess.log 2>&1; echo $$? > .test-preprocess.rc ) & \
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile --durations=$(PYTEST_DURATIONS); rc=$$?; \
	wait; echo "--- make test-preprocess"; cat .test-preprocess.log; \
	test $$rc -eq 0 && test "$$(cat .test-preprocess.rc)" = 0

# tokedge's preprocessing vs transformers' PIL and torchvision backends and video processors; prints
# the measured pixel and logit differences at the end (docs/runtime.md, "Which image-processor backend")
test-preprocess: $(TV_STAMP)
	$(TV_PY) -m pytest -q -p no:cacheprovider tests/preprocess

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
	rm -rf $(DEMO_OUT) .pytest_cache $(DIST) build .test-preprocess.log .test-preprocess.rc
