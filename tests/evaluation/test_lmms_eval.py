"""PIIP-LLaVA in real lmms-eval (no mocks): the bundled demo model answers TextVQA and MMBench splits in lmms-lab's
schemas through `python -m lmms_eval`, and lmms-eval's scores equal `piip-llava score` on the same answers.

lmms-eval lives in its own virtual environment (`make test-lmms` builds .venv-lmms and runs this file; CI does
so in its own step), because its requirements do not install beside ours as they are (see docs/lmms_eval.md).
In the default environment these tests skip, saying so.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PIIP_LLAVA_LMMS_TESTS") == "required":  # `make test-lmms`: a missing lmms-eval is a failure
    import lmms_eval
else:
    lmms_eval = pytest.importorskip(
        "lmms_eval", reason="lmms-eval is not installed in this environment; `make test-lmms` builds .venv-lmms and "
        "runs these tests there (CI does)."
    )

from piip_llava.cli import main
from piip_llava.evaluation.answers_file import read_answers
from piip_llava.evaluation.lmms.model import BUNDLED_MODEL_DIR, PIIPLlava, PIIPLlavaChat
from piip_llava.evaluation.mmbench import OPTION_LETTERS, load_mmbench_items, read_mmbench_dataset
from piip_llava.synthetic.export import export_dataset

EVAL_IMAGES = 8
BATCH_SIZE = 4
TASKS = ("piip_textvqa_val", "piip_mmbench_en_dev")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    export_dataset(root / "synthetic", seed=11, num_train_images=0, num_eval_images=EVAL_IMAGES, progress=False,
                   lmms_lab=True)
    return root


@pytest.fixture(scope="module")
def task_dir(data):
    lmms_lab = data / "synthetic/eval/lmms-lab"
    assert main(["lmms-tasks", "--out", str(data / "tasks"), "--textvqa", str(lmms_lab / "textvqa"),
                 "--mmbench", str(lmms_lab / "mmbench")]) == 0
    return data / "tasks"


def run_lmms_eval(task_dir, output, tasks, *extra):
    """`python -m lmms_eval` on our tasks with the demo model; returns its results and its sample files per task."""
    command = [sys.executable, "-m", "lmms_eval", "--model", "piip_llava", "--model_args",
               f"pretrained={BUNDLED_MODEL_DIR},device=cpu", "--include_path", str(task_dir),
               "--tasks", ",".join(tasks), "--batch_size", str(BATCH_SIZE), "--output_path", str(output),
               "--log_samples", "--verbosity", "WARNING", *extra]
    completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900,
                               env={**os.environ, **OFFLINE, "HF_HOME": str(output / "hf_home")})
    # lmms-eval exits 0 even when an evaluation fails: the results file is what tells.
    results_files = sorted(output.rglob("*_results.json"))
    assert results_files, f"lmms-eval wrote no results (exit {completed.returncode}):\n{completed.stdout[-3000:]}\n" \
                          f"{completed.stderr[-6000:]}"
    results = json.loads(results_files[-1].read_text())["results"]
    assert set(results) == set(tasks), completed.stderr[-6000:]
    return results, {task: next(output.rglob(f"*_samples_{task}.jsonl")) for task in tasks}


@pytest.fixture(scope="module")
def lmms_run(data, task_dir):
    """One run of both generation tasks through the chat interface (lmms-eval's default for piip_llava)."""
    return run_lmms_eval(task_dir, data / "lmms_output", TASKS)


def test_lmms_eval_finds_the_model_by_its_entry_point():
    from lmms_eval.models import get_model

    assert get_model("piip_llava") is PIIPLlavaChat
    assert get_model("piip_llava", force_simple=True) is PIIPLlava


def test_textvqa_score_of_lmms_eval_equals_ours_on_the_same_answers(data, lmms_run, tmp_path):
    results, samples = lmms_run
    lmms_accuracy = results["piip_textvqa_val"]["accuracy,none"]
    answers = tmp_path / "textvqa_answers.jsonl"
    assert main(["lmms-answers", "--samples", str(samples["piip_textvqa_val"]), "--out", str(answers)]) == 0
    metrics_file = tmp_path / "metrics.json"
    assert main(["score", "textvqa", "--annotation-file", str(data / "synthetic/eval/textvqa_annotations.json"),
                 "--result-file", str(answers), "--metrics-file", str(metrics_file)]) == 0
    ours = json.loads(metrics_file.read_text())
    assert ours["samples"] == EVAL_IMAGES and ours["unmatched_results"] == 0
    assert lmms_accuracy == ours["accuracy"]
    # The demo model reads: a score no guesser reaches on this split.
    assert lmms_accuracy > 25.0


def test_lmms_eval_answers_equal_piip_llava_eval_answers(data, lmms_run, tmp_path):
    """Same prompts (the model's chat template), same batches, greedy: the same answers as `piip-llava eval`."""
    _, samples = lmms_run
    answers = tmp_path / "lmms.jsonl"
    main(["lmms-answers", "--samples", str(samples["piip_textvqa_val"]), "--out", str(answers)])
    ours = tmp_path / "ours.jsonl"
    assert main(["eval", "textvqa", "--model-path", str(BUNDLED_MODEL_DIR), "--device", "cpu", "--dataset",
                 str(data / "synthetic/eval/lmms-lab/textvqa"), "--answers-file", str(ours),
                 "--batch-size", str(BATCH_SIZE)]) == 0

    def by_question(path):
        return {(record["question_id"], record["prompt"]): record["text"] for record in read_answers(path).records}

    assert by_question(answers) == by_question(ours)


def test_mmbench_scores_of_lmms_eval_equal_ours_with_the_llava_prompt(data, lmms_run, tmp_path):
    results, samples = lmms_run
    answers = tmp_path / "mmbench_answers.jsonl"
    assert main(["lmms-answers", "--samples", str(samples["piip_mmbench_en_dev"]), "--out", str(answers)]) == 0
    records = read_answers(answers).records
    assert len(records) == 4 * EVAL_IMAGES  # every circular round was asked
    assert records[0]["prompt"].count("\n") == 4 and "\nA. " in records[0]["prompt"]
    metrics_file = tmp_path / "metrics.json"
    assert main(["score", "mmbench", "--dataset", str(data / "synthetic/eval/lmms-lab/mmbench"),
                 "--result-file", str(answers), "--metrics-file", str(metrics_file)]) == 0
    ours = json.loads(metrics_file.read_text())
    assert results["piip_mmbench_en_dev"]["circular_accuracy,none"] == ours["circular_accuracy"]
    assert results["piip_mmbench_en_dev"]["vanilla_accuracy,none"] == ours["vanilla_accuracy"]
    assert ours["samples"] == EVAL_IMAGES and ours["vanilla_accuracy"] > 25.0


def test_loglikelihood_is_our_likelihood_score(data, rgb_image):
    """lmms-eval's loglikelihood requests get our reply log-likelihoods (the choices of one question together)."""
    from lmms_eval.api.instance import Instance

    from piip_llava.evaluation.likelihood import score_replies

    model = PIIPLlava(pretrained=str(BUNDLED_MODEL_DIR), device="cpu", batch_size=2)
    model.task_dict = {"task": {"test": [{"image": rgb_image}]}}
    choices = ["red", "blue", "A"]
    requests = [Instance("loglikelihood", ("What colour is the circle?", f" {choice}", lambda doc: [doc["image"]], 0,
                                           "task", "test"), idx=n, metadata={"task": "task", "doc_id": 0, "repeats": 1})
                for n, choice in enumerate(choices)]
    answers = [result.text for result in model.loglikelihood(requests)]
    [expected] = score_replies(model.model, model.processor, ["What colour is the circle?"], [rgb_image.convert("RGB")],
                               [choices])
    # Negative log-likelihoods: lmms-eval's multiple-choice scoring takes the smallest.
    assert answers == [(-score.log_likelihood, score.is_greedy) for score in expected]
    assert all(value > 0 for value, _ in answers)


def test_a_multiple_choice_task_answers_as_our_likelihood_protocol(data, task_dir, tmp_path):
    """lmms-eval's own multiple-choice scoring (simple interface) picks the options `--answer-by likelihood` picks."""
    task = "piip_mmbench_en_dev_likelihood"
    results, _ = run_lmms_eval(task_dir, tmp_path / "lmms_output", [task], "--force_simple")
    dataset = str(data / "synthetic/eval/lmms-lab/mmbench")
    answers = tmp_path / "likelihood.jsonl"
    main(["eval", "mmbench", "--model-path", str(BUNDLED_MODEL_DIR), "--device", "cpu", "--dataset", dataset,
          "--answers-file", str(answers), "--answer-by", "likelihood", "--batch-size", str(BATCH_SIZE)])
    items = {item.key: item for item in load_mmbench_items(read_mmbench_dataset(dataset))[0]}
    records = read_answers(answers).records
    assert len(records) == len(items) == 4 * EVAL_IMAGES
    right = [items[(r["question_id"], r["round_id"])].options.index(r["text"])
             == OPTION_LETTERS.index(items[(r["question_id"], r["round_id"])].answer) for r in records]
    assert results[task]["acc,none"] == pytest.approx(sum(right) / len(right))
    assert results[task]["acc,none"] > 0.25  # better than guessing among four


def test_a_broken_image_costs_its_document_only(rgb_image):
    from lmms_eval.api.instance import Instance

    def visual(doc):
        if doc["broken"]:
            raise OSError("cannot identify image file")
        return [rgb_image]

    model = PIIPLlava(pretrained=str(BUNDLED_MODEL_DIR), device="cpu", batch_size=2)
    model.task_dict = {"task": {"test": [{"broken": False}, {"broken": True}, {"broken": False}]}}
    requests = [Instance("generate_until", ("What colour is the circle?", {"max_new_tokens": 8, "until": []}, visual,
                                            n, "task", "test"), idx=0, metadata={"task": "task", "doc_id": n, "repeats": 1})
                for n in range(3)]
    answers = model.generate_until(requests)
    assert answers[1] == "" and answers[0] == answers[2] != ""


def test_sampling_is_refused_with_a_clear_error(rgb_image):
    from lmms_eval.api.instance import Instance

    model = PIIPLlava(pretrained=str(BUNDLED_MODEL_DIR), device="cpu")
    model.task_dict = {"task": {"test": [{}]}}
    request = Instance("generate_until", ("Hi?", {"temperature": 0.7}, lambda doc: [rgb_image], 0, "task", "test"),
                       idx=0, metadata={"task": "task", "doc_id": 0, "repeats": 1})
    with pytest.raises(ValueError, match="decodes greedily.*temperature=0.7"):
        model.generate_until([request])


def test_packaged_task_definitions_are_installed():
    from piip_llava.evaluation.lmms import TASKS_DIR

    assert {path.name for path in Path(TASKS_DIR).iterdir()} >= {"_piip_textvqa_yaml", "_piip_mmbench_yaml",
                                                             "_piip_mmbench_likelihood_yaml"}


def test_more_than_one_process_is_refused_rather_than_answering_everything_twice(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="runs in one process"):
        PIIPLlava(pretrained=str(BUNDLED_MODEL_DIR), device="cpu")
