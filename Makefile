# `make test`: create .venv, install everything (training side + runtime + dev), run the tests.
# `make demo`: install the runtime only (no torch) in .venv-runtime and inspect the sample images.
PYTHON ?= python3
VENV ?= .venv
RUNTIME_VENV ?= .venv-runtime
PY := $(VENV)/bin/python
RPY := $(RUNTIME_VENV)/bin/python
OPEN_CLIP := open_clip_torch==3.3.0

.PHONY: test demo install install-runtime clean

install: $(VENV)/.installed
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: this pin takes the CPU build from the machine's disk; a bare `torch` pulls CUDA
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[export,dev,serve]'
	# only the CLIP BPE vocabulary file is used; its dependencies (torchvision) would replace torch
	$(PY) -m pip install --no-deps $(OPEN_CLIP)
	touch $@

install-runtime: $(RUNTIME_VENV)/.installed
$(RUNTIME_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(RUNTIME_VENV)
	$(RPY) -m pip install -q --upgrade pip
	$(RPY) -m pip install -e .
	touch $@

test: install
	$(PY) -m pytest -q --import-mode=importlib tests

demo: install-runtime
	$(RPY) -m anomalygpt_edge inspect --bundle demo/bundle demo/samples/*.png --save-maps demo/out

clean:
	rm -rf $(VENV) $(RUNTIME_VENV) build *.egg-info
