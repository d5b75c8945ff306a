from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="piip-llava",
    version="0.1.0",
    description="Parameter-Inverted Image Pyramid networks and PIIP-LLaVA, native to Hugging Face transformers",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # The top-level configs/ folder ships inside the package as piip_llava/configs.
    packages=find_packages(include=["piip_llava", "piip_llava.*"]) + ["piip_llava.configs"],
    package_dir={"piip_llava.configs": "configs"},
    include_package_data=True,
    package_data={
        "piip_llava": ["assets/**/*"],
        "piip_llava.configs": ["*.json", "perception/*.json"],
        "piip_llava.evaluation.lmms": ["tasks/*"],
    },
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the install step (see README): a bare requirement would pull a CUDA build.
        "torch>=2.4",
        "transformers>=5.20,<6",
        "accelerate>=1.0",
        "peft>=0.17",
        "datasets>=3.0",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "pillow>=10",
        "numpy>=1.26",
        "tqdm>=4.66",
        "openpyxl>=3.1",
        "pandas>=2.0",
    ],
    extras_require={
        "train": ["deepspeed>=0.16"],
        # setuptools 70.1+ builds wheels itself: tests/package builds one without build isolation.
        "dev": ["deepspeed>=0.16", "pytest>=8", "ruff>=0.6", "matplotlib>=3.7", "setuptools>=70.1",
                "pycocotools>=2.0.7", "scipy>=1.10"],
        # Detection / segmentation task models: COCO-style mAP (pycocotools) and the DETR family's Hungarian
        # matching (scipy).
        "perception": ["pycocotools>=2.0.7", "scipy>=1.10"],
        "experiments": ["matplotlib>=3.7"],
        "gpu": ["flash-attn>=2.6"],
        # lmms-eval 0.7's evaluator patches filelock._api, which filelock 4 removed. On a CPU-only machine install
        # with constraints-lmms.txt, then remove torchvision (docs/lmms_eval.md): lmms-eval pulls a CUDA build.
        "lmms": ["lmms-eval>=0.7.3,<0.8", "filelock>=3.16,<4"],
        # `piip-llava serve --web`: the gradio chat page.
        "web": ["gradio>=6.0,<7"],
    },
    entry_points={
        "console_scripts": ["piip-llava=piip_llava.cli:main"],
        # lmms-eval finds `--model piip_llava` here (no --include_path for the model).
        "lmms_eval.models": ["piip_llava=piip_llava.evaluation.lmms:model_manifest"],
        # vLLM loads this in each of its processes: `vllm serve DIR` then knows PIIP-LLaVA (see docs/serving.md).
        "vllm.general_plugins": ["piip_llava = piip_llava.serving.vllm_plugin:register"],
    },
)
