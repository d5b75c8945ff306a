# Set-up and the two everyday commands. Everything installs into .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo chat test lint

$(VENV)/installed: setup.py
	$(PYTHON) -m venv $(VENV)
	# CPU build of torch from the local wheel cache; a bare `torch` requirement would pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# What runs without any weights: the published PIIP encoders' parameters and GFLOPs, then a
# randomly initialised tiny PIIP-LLaVA answering through generate() (gibberish, but every part runs).
demo: $(VENV)/installed
	$(VENV)/bin/piip-llava flops --all
	$(PY) -m piip_llava.demo

# Chat about an image with a model directory: make chat MODEL=path/to/model IMAGE=path/to/image.png
chat: $(VENV)/installed
	$(VENV)/bin/piip-llava chat --model "$(MODEL)" --image "$(IMAGE)"

test: $(VENV)/installed
	$(PY) -m pytest -q tests

lint: $(VENV)/installed
	$(VENV)/bin/ruff check piip_llava tests
