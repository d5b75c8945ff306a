# Set-up and the two everyday commands. Everything installs into .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

IMAGE ?= piip_llava/assets/examples/example_shapes.png
PROMPT ?= What colour is the circle?
MODEL ?=

PUBLISHED := clip-l14_336 clip-bl_512-256 convnext-b_clip-l_640-224 clip-bl_512-448 \
	convnext-b_clip-l_1024-336 convnext-l_clip-l_1024-336

.PHONY: demo chat test lint demo-model experiment

$(VENV)/installed: setup.py
	$(PYTHON) -m venv $(VENV)
	# CPU build of torch from the local wheel cache; a bare `torch` requirement would pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# What runs without any weights: parameters and GFLOPs of every published PIIP-LLaVA encoder,
# computed on the meta device.
demo: $(VENV)/installed
	for variant in $(PUBLISHED); do $(VENV)/bin/piip-llava flops piip_vision_$$variant || exit 1; echo; done

# Chat about an image with a PIIP-LLaVA directory: make chat MODEL=converted/clip-bl_512-256_7B IMAGE=photo.jpg
chat: $(VENV)/installed
	$(VENV)/bin/piip-llava chat --image "$(IMAGE)" --prompt "$(PROMPT)" $(if $(MODEL),--model "$(MODEL)")

test: $(VENV)/installed
	$(PY) -m pytest -q tests

lint: $(VENV)/installed
	$(VENV)/bin/ruff check piip_llava tests scripts benchmarks eval

# Retrain the bundled demo model from scratch and install it (2 cores: 25.3 minutes for the shipped model on an
# AMD EPYC with AVX512_BF16, stage 0's two halves side by side; 66 on an AVX2-only one, one after the other;
# docs/training.md).
demo-model: $(VENV)/installed
	$(PY) scripts/train_demo_model.py --work-dir outputs/demo --install --large-check 600

# PIIP against single-branch baselines (hours on 2 cores; resumable).
experiment: $(VENV)/installed
	$(PY) scripts/piip_experiment.py --work-dir outputs/demo
