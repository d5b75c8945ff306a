"""The bundled demo model: it ships with the package, loads through the Auto classes, is the default of
`piip-llava chat`, and answers questions about the bundled example images correctly."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from piip_llava.chat_session import BUNDLED_MODEL_DIR
from piip_llava.cli import main
from piip_llava.evaluation.answer_normalization import normalize_answer

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "piip_llava" / "assets" / "examples"
SIZE_BUDGET_BYTES = 30 * 10**6


@pytest.fixture(scope="module")
def demo_model():
    processor = AutoProcessor.from_pretrained(BUNDLED_MODEL_DIR)
    model = AutoModelForImageTextToText.from_pretrained(BUNDLED_MODEL_DIR).eval()
    return model, processor


def examples():
    return [pytest.param(example, id=f"{example['image']}-{example['question_type']}")
            for example in json.loads((EXAMPLES_DIR / "examples.json").read_text())]


def ask(model, processor, image, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_the_bundled_model_ships_within_budget_as_safetensors():
    files = {path.name: path.stat().st_size for path in BUNDLED_MODEL_DIR.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert sum(files.values()) <= SIZE_BUDGET_BYTES
    config = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "piip_llava" and len(config["vision_config"]["branches"]) == 2


@pytest.mark.parametrize("example", examples())
def test_the_bundled_model_answers_the_bundled_examples(demo_model, example):
    from PIL import Image

    model, processor = demo_model
    with Image.open(EXAMPLES_DIR / example["image"]) as image:
        answer = ask(model, processor, image.convert("RGB"), example["prompt"])
    assert normalize_answer(answer) == normalize_answer(example["answer"])


def test_chat_command_defaults_to_the_bundled_model(capsys):
    # The README's first command: `make chat` asks exactly this.
    status = main(["chat", "--image", str(EXAMPLES_DIR / "example_shapes.png"), "--prompt",
                   "What colour is the circle?", "--max-new-tokens", "8"])
    assert status == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].strip().lower() == "red"


def test_the_bundled_model_answers_a_multiple_choice_question_with_the_right_option(demo_model):
    from PIL import Image

    from piip_llava.evaluation.mmbench import extract_option_letter
    from piip_llava.synthetic.questions import MULTIPLE_CHOICE_INSTRUCTION

    model, processor = demo_model
    options = ("left", "top", "centre", "right")
    prompt = "Where is the red circle?\n" + "\n".join(f"{letter}. {option}" for letter, option in zip("ABCD", options))
    with Image.open(EXAMPLES_DIR / "example_shapes.png") as image:
        answer = ask(model, processor, image.convert("RGB"), f"{prompt}\n{MULTIPLE_CHOICE_INSTRUCTION}")
    assert extract_option_letter(answer, options) == "C"


def training_script_and_shipped_results():
    """scripts/train_demo_model.py as a module, and the shipped model's results it wrote."""
    import importlib.util

    repo = EXAMPLES_DIR.parents[2]
    spec = importlib.util.spec_from_file_location("train_demo_model", repo / "scripts" / "train_demo_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script, json.loads((repo / "docs" / "demo_model_results.json").read_text())


def test_the_results_table_sets_each_score_beside_chance_and_the_majority_answer():
    script, results = training_script_and_shipped_results()
    types = script.QUESTION_TYPES
    # A different chance and majority per type, so a row that read another type's figures would show.
    stats = {
        "chance_accuracy": {
            "textvqa": {kind: (number + 1) / 100 for number, kind in enumerate(types)},
            "mmbench": {kind: {"vanilla": 0.25, "circular": 0.25**4} for kind in types},
        },
        "majority_answer_accuracy": {
            "textvqa": {kind: (number + 11) / 100 for number, kind in enumerate(types)},
            "mmbench_vanilla": {kind: (number + 21) / 100 for number, kind in enumerate(types)},
        },
    }
    rows = script.results_markdown(results, stats).splitlines()
    assert len(rows) == 2 + len(types) + 1
    for number, kind in enumerate(types):
        (row,) = [row for row in rows if row.startswith(f"| {kind} (")]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        category = results["mmbench"]["per_category"][kind]
        likely = results["mmbench_likelihood"]["per_category"][kind]
        assert cells[1:] == [
            f"{results['textvqa_by_type'][kind]['accuracy']:.0f}", f"{number + 1:.1f}", f"{number + 11}",
            f"{category['vanilla_accuracy']:.0f}", "25", f"{number + 21}", f"{category['circular_accuracy']:.0f}", "0.4",
            f"{category['vanilla_no_option_percent']:.0f}", f"{likely['vanilla_accuracy']:.0f}",
            f"{likely['circular_accuracy']:.0f}",
        ]
    total = [cell.strip() for cell in rows[-1].strip("|").split("|")]
    mmbench, by_likelihood = results["mmbench"], results["mmbench_likelihood"]
    assert total == ["all", f"{results['textvqa']['accuracy']:.1f}", "", "", f"{mmbench['vanilla_accuracy']:.1f}", "25",
                     "", f"{mmbench['circular_accuracy']:.1f}", "0.4", "", f"{by_likelihood['vanilla_accuracy']:.1f}",
                     f"{by_likelihood['circular_accuracy']:.1f}"]
    stats["eval"] = {"images": 150}
    document = script.results_document(results, stats, results, {**stats, "eval": {"images": 600}})
    assert "(150 images)" in document and "(600 images)" in document and document.count("| all |") == 2
    assert document.count("| small text: numbers |") == 2


def test_the_text_table_splits_each_size_into_words_and_numbers():
    script, results = training_script_and_shipped_results()
    rows = script.text_kinds_markdown(results).splitlines()
    assert len(rows) == 2 + 4
    by_kind = results["text_by_kind"]
    for question_type, name in (("text_large", "large text"), ("text_small", "small text")):
        for kind in ("words", "numbers"):
            (row,) = [row for row in rows if row.startswith(f"| {name}: {kind} |")]
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            open_format = by_kind["textvqa"][question_type][kind]
            choice, likely = by_kind["mmbench"][question_type][kind], by_kind["mmbench_likelihood"][question_type][kind]
            assert cells[1:] == [
                f"{open_format['accuracy']:.0f}", f"{choice['vanilla_accuracy']:.0f}",
                f"{choice['circular_accuracy']:.0f}", f"{choice['vanilla_no_option_percent']:.0f}",
                f"{likely['vanilla_accuracy']:.0f}", f"{likely['circular_accuracy']:.0f}",
                f"{open_format['samples']} + {choice['questions']}",
            ]


def test_the_readme_quotes_the_shipped_models_large_split_scores():
    """README copies the larger split's table from docs/demo_model_results.md; a retrained model must not leave
    it quoting the previous one."""
    _, results = training_script_and_shipped_results()
    large = results["large_check"]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    labels = {"shape": "| shape (", "count": "| count |", "position": "| position (", "colour": "| colour (",
              "text_large": "| large text (", "text_small": "| small text |"}
    for kind, label in labels.items():
        (row,) = [line for line in readme.splitlines() if line.startswith(label)]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        category = large["mmbench"]["per_category"][kind]
        likely = large["mmbench_likelihood"]["per_category"][kind]
        assert cells[1] == f"{large['textvqa_by_type'][kind]['accuracy']:.0f}"
        assert cells[3:5] == [f"{category['vanilla_accuracy']:.0f}", f"{category['circular_accuracy']:.0f}"]
        assert cells[6:] == [f"{category['vanilla_no_option_percent']:.0f}",
                             f"{likely['vanilla_accuracy']:.0f} / {likely['circular_accuracy']:.0f}"]
    (total,) = [line for line in readme.splitlines() if line.startswith("| all | ")]
    cells = [cell.strip() for cell in total.strip("|").split("|")]
    likely = large["mmbench_likelihood"]
    assert cells[1] == f"{large['textvqa']['accuracy']:.1f}"
    assert cells[3:5] == [f"{large['mmbench']['vanilla_accuracy']:.1f}", f"{large['mmbench']['circular_accuracy']:.1f}"]
    assert cells[-1] == f"{likely['vanilla_accuracy']:.1f} / {likely['circular_accuracy']:.1f}"
    for question_type, name in (("text_large", "large text"), ("text_small", "small text")):
        for kind in ("words", "numbers"):
            (row,) = [line for line in readme.splitlines() if line.startswith(f"| {name}: {kind} |")]
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            assert cells[1] == f"{large['text_by_kind']['textvqa'][question_type][kind]['accuracy']:.0f}"
            assert cells[2] == f"{large['text_by_kind']['mmbench'][question_type][kind]['vanilla_accuracy']:.0f}"
