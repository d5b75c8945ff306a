"""PIIP-LLaVA in lmms-eval: the model (entry-point group `lmms_eval.models`) and TextVQA / MMBench tasks for local data.

After `pip install "piip-llava[lmms]"`, lmms-eval finds the model by itself:

    piip-llava lmms-tasks --out tasks --textvqa data/textvqa --mmbench data/mmbench/en
    python -m lmms_eval --model piip_llava --model_args pretrained=DIR --include_path tasks \\
        --tasks piip_textvqa_val,piip_mmbench_en_dev --batch_size 8 --output_path out --log_samples

The tasks' prompts, answer extraction and scores are our evaluation harness's (`piip-llava eval`), so
lmms-eval's numbers and ours agree on the same answers; `piip-llava lmms-answers` turns lmms-eval's
logged samples into our answer files to check that. This package imports lmms-eval only in `model`
and in `model_manifest`, which lmms-eval alone calls.
"""

from pathlib import Path

MODEL_ID = "piip_llava"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def model_manifest():
    """The `lmms_eval.models` entry point: `--model piip_llava` is the chat model, `--force_simple` the simple one."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        simple_class_path="piip_llava.evaluation.lmms.model.PIIPLlava",
        chat_class_path="piip_llava.evaluation.lmms.model.PIIPLlavaChat",
    )
