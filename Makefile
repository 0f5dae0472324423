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

.PHONY: install test demo wheels clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)

$(D2_WHEEL):
	$(PYTHON) scripts/build_detectron2_wheel.py --out wheels --cache wheels/.cache

$(VENV)/.installed: $(PY) $(D2_WHEEL) requirements.txt pyproject.toml
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps $(D2_WHEEL)
	$(PIP) install --no-deps -e .
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m cellkit demo --data $(DATA) --out $(OUT)
