# cellkit: the two commands a new user runs are `make demo` (main job) and `make test` (tests).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is installed only when the venv lacks it: on Kaggle/Colab use `make install VENV_SYSTEM=1`
# (or `pip install -e .` plus requirements.txt) and the preinstalled CUDA torch is kept.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
D2_WHEEL := wheels/detectron2-0.6+sal072-py3-none-any.whl
DATA ?= data/demo
OUT ?= runs/demo

.PHONY: install test demo wheels

$(PY):
	$(PYTHON) -m venv $(VENV)

$(D2_WHEEL):
	$(PYTHON) scripts/build_detectron2_wheel.py --out wheels --cache wheels/.cache

# The packages go in with uv, a pip-compatible installer: it unpacks torch and its CUDA wheels (~4 GB) in parallel
# (RESULTS.md: install times). It byte-compiles them as pip does (a process that may not write __pycache__, as under
# PYTHONDONTWRITEBYTECODE, would compile every module it imports again). uv reads no pip configuration:
# scripts/uv_env.py hands pip's indexes, find-links, constraints and CA bundle on to it. INSTALLER=pip uses pip.
INSTALLER ?= uv
INSTALL = $(if $(filter pip,$(INSTALLER)),$(PIP) install,env $(shell $(PYTHON) scripts/uv_env.py) $(VENV)/bin/uv pip install --compile-bytecode --python $(PY))

$(VENV)/.installed: $(PY) $(D2_WHEEL) requirements.txt pyproject.toml
	$(if $(filter pip,$(INSTALLER)),,$(PIP) install -q uv)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(INSTALL) $(TORCH_SPEC)
	$(INSTALL) -r requirements.txt
	$(INSTALL) --no-deps $(D2_WHEEL)
	$(INSTALL) --no-deps -e .
	touch $@

install: $(VENV)/.installed

# The tests run in TEST_WORKERS processes (pytest-xdist; a file's tests stay in one process, the files with slow tests
# start first, each process gets its share of the cores: tests/conftest.py). TEST_WORKERS=0 runs them in this one.
TEST_WORKERS ?= 2
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20 tests

# Main job: the six notebooks (papermill) on the synthetic data with the `demo` preset -> $(OUT)/submission.csv and
# the CV score. `make demo DATA=../shared/data/sartorius` runs the same chain on a competition-layout folder.
# 40 synthetic images: every fold holds all three cell types. DEMO_ITERATIONS caps the training iterations
# (0 = the demo preset's SOLVER.MAX_ITER, 300 iterations, ~2 s each on this 2-core box); DEMO_ARGS adds chain options.
DEMO_IMAGES ?= 40
DEMO_ITERATIONS ?= 0
DEMO_ARGS ?=
demo: install
	@if [ "$(DATA)" = "data/demo" ] && [ ! -f data/demo/train.csv ]; then \
		echo "+ generating the synthetic demo data in data/demo"; \
		$(PY) -m cellkit synth data/demo --images $(DEMO_IMAGES) --seed 0; fi
	$(PY) -m cellkit chain --data $(DATA) --out $(OUT) --preset demo --iterations $(DEMO_ITERATIONS) --log-output \
		$(DEMO_ARGS)

# Kaggle (README "On Kaggle"): the owner is KAGGLE_USER, else KAGGLE_USERNAME, else ~/.kaggle/kaggle.json.
# `make kernels` renders kernels/<name>/ (metadata + the notebook with Kaggle parameters, papermill --prepare-only) for
# MACHINE_SHAPE (GPU T4 x2 by default; the training kernels use all its GPUs unless NUM_GPUS is given; RESUME=1 makes
# them attach their own previous output and continue it); `make wheels` builds the offline wheels dataset in wheels/
# for Kaggle's Pythons (KAGGLE_PYTHON); `make weights RUN=runs/demo` builds the weights dataset in weights/.
KAGGLE_USER ?=
KAGGLE_PYTHON ?= 3.12,3.13
MACHINE_SHAPE ?= NvidiaTeslaT4
NUM_GPUS ?=
RESUME ?=
RUN ?= $(OUT)
KAGGLE_OWNER_ARG := $(if $(KAGGLE_USER),--owner $(KAGGLE_USER))
.PHONY: kernels weights
kernels: install
	$(PY) -m cellkit kernels $(KAGGLE_OWNER_ARG) --machine-shape $(MACHINE_SHAPE) \
		$(if $(NUM_GPUS),--num-gpus $(NUM_GPUS)) $(if $(RESUME),--resume)

wheels: install
	$(PY) -m cellkit wheels --out wheels $(KAGGLE_OWNER_ARG) --python-versions $(KAGGLE_PYTHON)

weights: install
	$(PY) -m cellkit weights --run $(RUN) --out weights $(KAGGLE_OWNER_ARG)
