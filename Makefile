# `make test`: create .venv, install everything (training side + runtime + dev), run the tests.
# `make demo`: install the runtime only (no torch) in .venv-runtime and inspect the shipped samples
#              with the shipped demo model; heatmap overlays go to demo-out/.
# `make demo-model`: retrain the demo model, re-export and re-measure it (28 min on 2 AMD EPYC cores with
#              AVX-512, ~45 on an Intel Xeon (model 207), over 50 on an AVX2-only EPYC).
PYTHON ?= python3
VENV ?= .venv
RUNTIME_VENV ?= .venv-runtime
PY := $(VENV)/bin/python
RPY := $(RUNTIME_VENV)/bin/python
OPEN_CLIP := open_clip_torch==3.3.0

DEMO := runtime/demo
DEMO_CLASSES := woven_fabric brushed_metal wood_grain ceramic_tiles washer

.PHONY: test demo demo-model install install-runtime clean

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
	@test -f $(DEMO)/bundle/manifest.json || { echo "no demo bundle in $(DEMO)/bundle (make demo-model builds one)"; exit 2; }
	@for c in $(DEMO_CLASSES); do \
	  $(RPY) -m anomalygpt_edge inspect --bundle $(DEMO)/bundle --verify --class $$c --save-maps demo-out \
	    $(DEMO)/samples/$$c-*.png || exit $$?; \
	done
	@echo "heatmap overlays: demo-out/"

demo-model: install
	$(PY) -m anomalygpt_edge.models.train --work .demo-work --bundle $(DEMO)/bundle
	$(PY) -m anomalygpt_edge.benchmarks.demo_report --bundle $(DEMO)/bundle --work .demo-work --out $(DEMO) \
	  --samples $(DEMO)/samples --keep-history

clean:
	rm -rf $(VENV) $(RUNTIME_VENV) build *.egg-info demo-out
