"""scripts/piip_experiment.py's results: one table per held-out split, the larger first, every figure from its row."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "piip_experiment.py"


def load_script():
    spec = importlib.util.spec_from_file_location("piip_experiment", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up while the class is made
    spec.loader.exec_module(script)
    return script


def results(offset: float) -> dict:
    """Evaluation results whose every figure is distinct, so a cell read from the wrong place shows."""
    types = load_script().QUESTION_TYPES
    return {
        "textvqa": {"accuracy": 50 + offset},
        "textvqa_by_type": {name: {"accuracy": 10 * number + offset} for number, name in enumerate(types)},
        "mmbench": {"vanilla_accuracy": 60 + offset, "circular_accuracy": 55 + offset},
        "mmbench_likelihood": {"vanilla_accuracy": 70 + offset, "per_category": {
            name: {"vanilla_accuracy": 5 * number + offset} for number, name in enumerate(types)}},
    }


def test_each_split_gets_its_own_table_larger_first_with_likelihood_columns():
    script = load_script()
    variant = script.VARIANTS[0]
    splits = [script.split_summary(results(0.25), 150), script.split_summary(results(0.5), 600)]
    row = script.summarise(variant, {"gflops": 0.297, "parameters_m": 3.3}, splits)
    document = script.results_document([row], chance=None)
    first, second = document.split("Held-out split of")[1:]
    assert first.startswith(" 600 images (100 questions per type") and second.startswith(" 150 images (25 questions")
    cells = [cell.strip() for cell in first.strip().splitlines()[-1].strip("|").split("|")]
    types = script.QUESTION_TYPES
    assert cells[0] == variant.name and cells[2:4] == ["0.297", "3.30"]
    assert cells[4:] == ["50.5", *(f"{10 * number + 0.5:.1f}" for number in range(len(types))), "60.5", "55.5", "70.5",
                         f"{5 * types.index('text_large') + 0.5:.1f}", f"{5 * types.index('text_small') + 0.5:.1f}"]
