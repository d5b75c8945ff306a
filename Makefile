# Set-up and the two everyday commands. Everything installs into .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

IMAGE ?= piip_llava/assets/examples/example_shapes.png
PROMPT ?= What colour is the circle?
MODEL ?=

.PHONY: chat test lint demo-model experiment

$(VENV)/installed: setup.py
	$(PYTHON) -m venv $(VENV)
	# CPU build of torch from the local wheel cache; a bare `torch` requirement would pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Ask the bundled demo model (or MODEL=dir) about a bundled example image (or IMAGE=path).
chat: $(VENV)/installed
	$(VENV)/bin/piip-llava chat --image "$(IMAGE)" --prompt "$(PROMPT)" $(if $(MODEL),--model "$(MODEL)")

test: $(VENV)/installed
	$(PY) -m pytest -q tests

lint: $(VENV)/installed
	$(VENV)/bin/ruff check piip_llava tests scripts benchmarks eval

# Retrain the bundled demo model from scratch (about 25 minutes on 2 cores) and install it.
demo-model: $(VENV)/installed
	$(PY) scripts/train_demo_model.py --work-dir outputs/demo --install

# PIIP against single-branch baselines (hours on 2 cores; resumable).
experiment: $(VENV)/installed
	$(PY) scripts/piip_experiment.py --work-dir outputs/demo
