# Set-up and the two everyday commands. Everything installs into .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

IMAGE ?= piip_llava/assets/examples/example_shapes.png
PROMPT ?= What colour is the circle?
MODEL ?=

PUBLISHED := clip-l14_336 clip-bl_512-256 convnext-b_clip-l_640-224 clip-bl_512-448 \
	convnext-b_clip-l_1024-336 convnext-l_clip-l_1024-336

.PHONY: demo chat test test-lmms lint demo-model experiment

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

# lmms-eval in an environment of its own, beside the CPU torch: its requirements would otherwise pull a newer
# torchvision and, with it, a CUDA torch over ours (constraints-lmms.txt and docs/lmms_eval.md say what is pinned).
LMMS_VENV := .venv-lmms
$(LMMS_VENV)/installed: setup.py constraints-lmms.txt
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(LMMS_VENV)/bin/python -m pip install --quiet -c constraints-lmms.txt -e ".[lmms]" "pytest>=8"
	# PyPI's torchvision is a CUDA build that cannot load beside the CPU torch; nothing on this path imports it.
	$(LMMS_VENV)/bin/python -m pip uninstall --quiet --yes torchvision
	$(LMMS_VENV)/bin/python -c "import torch, lmms_eval.evaluator; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	touch $@

# The lmms-eval tests, for real: the bundled demo model through `python -m lmms_eval` (a few minutes).
test-lmms: $(LMMS_VENV)/installed
	PIIP_LLAVA_LMMS_TESTS=required $(LMMS_VENV)/bin/python -m pytest -q tests/test_lmms_eval.py

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
