"""End to end: a tiny checkpoint answers tiny TextVQA and MMBench files in the official formats.

The `tiny_model_dir` fixture below builds a transformers `LlavaForConditionalGeneration`; swap it for
a tiny PIIP-LLaVA checkpoint once one can be built, nothing else here depends on the model class.
"""

import base64
import io
import json

import pandas as pd
import pytest
from PIL import Image

from piip_llava.cli import main
from piip_llava.evaluation import generation
from piip_llava.evaluation.answers_file import read_answers

CORPUS = [
    "What brand is this camera? Answer the question using a single word or phrase.",
    "Which animal is shown? A. cat B. dog C. bird Answer with the option's letter from the given choices directly.",
    "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
]


# The model under test is conftest's `tiny_model_dir`: a saved tiny PIIP-LLaVA with its processor.


def make_textvqa_files(root, with_missing_image=True):
    """LLaVA's question JSONL, an image folder and a TextVQA_0.5.1_val.json-style annotation file."""
    images = root / "train_images"
    images.mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for n in range(5):
        image_id = f"{n:016x}"
        Image.new("RGB", (24 + n, 20), (40 * n, 100, 200)).save(images / f"{image_id}.jpg")
        question = f"What number is on sign {n}?"
        questions.append({"question_id": image_id, "image": f"{image_id}.jpg",
                          "text": f"{question}\nReference OCR token: {n}, sign\n"
                                  "Answer the question using a single word or phrase."})
        annotations.append({"image_id": image_id, "question": question, "question_id": 100 + n,
                            "answers": [str(n)] * 10})
    if with_missing_image:
        questions.append({"question_id": "ffff", "image": "ffff.jpg", "text": "Gone?\nAnswer the question using a single "
                          "word or phrase."})
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "annotations.json").write_text(json.dumps({"data": annotations}))
    return root


def textvqa_args(model_dir, root, answers, *extra):
    return ["eval", "textvqa", "--model-path", str(model_dir), "--question-file", str(root / "questions.jsonl"),
            "--image-folder", str(root / "train_images"), "--annotation-file", str(root / "annotations.json"),
            "--answers-file", str(answers), "--max-new-tokens", "3", *extra]


def answers_by_key(path, fields=("question_id", "prompt")):
    return {tuple(record[name] for name in fields): record["text"] for record in read_answers(path).records}


def test_textvqa_end_to_end_with_a_missing_image(tiny_model_dir, tmp_path, capsys):
    root = make_textvqa_files(tmp_path)
    answers, metrics_file = tmp_path / "answers.jsonl", tmp_path / "metrics.json"
    status = main(textvqa_args(tiny_model_dir, root, answers, "--batch-size", "2", "--metrics-file", str(metrics_file)))
    assert status == 0
    records = read_answers(answers).records
    assert len(records) == 5  # the question whose image is missing is skipped, the rest answered
    assert set(records[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert records[0]["prompt"].endswith("Answer the question using a single word or phrase.")
    output = capsys.readouterr().out
    assert "Samples: 5\nAccuracy: " in output
    metrics = json.loads(metrics_file.read_text())
    assert metrics["samples"] == 5 and 0.0 <= metrics["accuracy"] <= 100.0
    assert metrics["skipped_inputs"] == 1 and "image could not be loaded" in metrics["skipped_examples"][0]["reason"]


def test_textvqa_resumes_after_a_kill_between_batches(tiny_model_dir, tmp_path, monkeypatch):
    root = make_textvqa_files(tmp_path, with_missing_image=False)
    reference = tmp_path / "reference.jsonl"
    main(textvqa_args(tiny_model_dir, root, reference, "--batch-size", "2"))

    answers = tmp_path / "answers.jsonl"
    real_answer_batch = generation.answer_batch
    calls = []

    def killed_after_one_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt("simulated kill")
        return real_answer_batch(*args, **kwargs)

    monkeypatch.setattr(generation, "answer_batch", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        main(textvqa_args(tiny_model_dir, root, answers, "--batch-size", "2"))
    assert len(read_answers(answers).records) == 2  # the finished batch is on disk
    monkeypatch.setattr(generation, "answer_batch", real_answer_batch)
    main(textvqa_args(tiny_model_dir, root, answers, "--batch-size", "2"))
    records = read_answers(answers).records
    assert len(records) == 5 and len({r["question_id"] for r in records}) == 5  # nothing lost, nothing twice
    assert answers_by_key(answers) == answers_by_key(reference)


def test_textvqa_resume_drops_a_truncated_last_line(tiny_model_dir, tmp_path):
    root = make_textvqa_files(tmp_path, with_missing_image=False)
    answers = tmp_path / "answers.jsonl"
    main(textvqa_args(tiny_model_dir, root, answers, "--batch-size", "1"))
    complete = answers_by_key(answers)
    text = answers.read_text()
    answers.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])  # kill in the middle of a write
    assert read_answers(answers).truncated_tail
    main(textvqa_args(tiny_model_dir, root, answers, "--batch-size", "1"))
    content = read_answers(answers)
    assert not content.truncated_tail and len(content.records) == 5
    assert answers_by_key(answers) == complete


def test_textvqa_shards_merge_in_question_order(tiny_model_dir, tmp_path):
    root = make_textvqa_files(tmp_path, with_missing_image=False)
    answers = tmp_path / "answers.jsonl"
    for index in (1, 0):
        main(textvqa_args(tiny_model_dir, root, answers, "--num-shards", "2", "--shard-index", str(index)))
    assert (tmp_path / "answers.shard-0-of-2.jsonl").exists() and (tmp_path / "answers.shard-1-of-2.jsonl").exists()
    merged = [record["question_id"] for record in read_answers(answers).records]
    assert merged == [f"{n:016x}" for n in range(5)]


def test_textvqa_from_a_local_parquet_dataset(tiny_model_dir, tmp_path):
    import datasets

    root = make_textvqa_files(tmp_path, with_missing_image=False)
    questions = [json.loads(line) for line in (root / "questions.jsonl").read_text().splitlines()]
    features = datasets.Features(
        {"question_id": datasets.Value("string"), "text": datasets.Value("string"), "image": datasets.Image()}
    )
    dataset = datasets.Dataset.from_dict(
        {"question_id": [q["question_id"] for q in questions], "text": [q["text"] for q in questions],
         "image": [str(root / "train_images" / q["image"]) for q in questions]},
        features=features,
    )
    dataset.to_parquet(str(tmp_path / "textvqa.parquet"))
    answers = tmp_path / "answers.jsonl"
    status = main(["eval", "textvqa", "--model-path", str(tiny_model_dir), "--dataset", str(tmp_path / "textvqa.parquet"),
                   "--annotation-file", str(root / "annotations.json"), "--answers-file", str(answers),
                   "--max-new-tokens", "3"])
    assert status == 0
    assert [r["question_id"] for r in read_answers(answers).records] == [q["question_id"] for q in questions]


def png_base64(color) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def mmbench_rows(with_answers=True):
    rows = [
        {"index": 0, "question": "Which animal?", "hint": "A pet.", "A": "cat", "B": "dog", "C": "bird", "D": "fish",
         "answer": "B", "category": "recognition", "l2-category": "perception", "image": png_base64((255, 0, 0))},
        {"index": 1, "question": "Which colour?", "hint": None, "A": "red", "B": "blue", "C": None, "D": None,
         "answer": "A", "category": "colour", "l2-category": "perception", "image": png_base64((0, 0, 255))},
        {"index": 2, "question": "Broken image?", "hint": None, "A": "yes", "B": "no", "C": None, "D": None,
         "answer": "A", "category": "colour", "l2-category": "perception", "image": "bm90IGFuIGltYWdl"},
        {"index": 3, "question": "Bad answer?", "hint": None, "A": "yes", "B": "no", "C": None, "D": None,
         "answer": "Z", "category": "colour", "l2-category": "perception", "image": png_base64((0, 255, 0))},
    ]
    if not with_answers:
        for row in rows:
            row.pop("answer")
    return rows


def mmbench_args(model_dir, tsv, answers, *extra):
    return ["eval", "mmbench", "--model-path", str(model_dir), "--question-file", str(tsv), "--answers-file",
            str(answers), "--max-new-tokens", "2", "--batch-size", "3", *extra]


def test_mmbench_end_to_end_all_rounds_and_bad_rows(tiny_model_dir, tmp_path, capsys):
    tsv = tmp_path / "mmbench_dev.tsv"
    pd.DataFrame(mmbench_rows()).to_csv(tsv, sep="\t", index=False)
    answers, metrics_file = tmp_path / "answers.jsonl", tmp_path / "metrics.json"
    status = main(mmbench_args(tiny_model_dir, tsv, answers, "--metrics-file", str(metrics_file)))
    assert status == 0
    records = read_answers(answers).records
    # 4 rounds + 2 rounds; the undecodable image and the bad answer letter are skipped, the rest go on.
    assert [(r["question_id"], r["round_id"]) for r in records] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert records[1]["options"] == ["dog", "bird", "fish", "cat"] and records[1]["option_char"] == ["B", "C", "D", "A"]
    assert "Circular accuracy:" in capsys.readouterr().out
    metrics = json.loads(metrics_file.read_text())
    assert metrics["samples"] == 2 and metrics["skipped_inputs"] == 3  # 1 bad row + 2 rounds of the broken image
    assert set(metrics["per_category"]) == {"recognition", "colour"}
    assert metrics["unanswered_questions"] == 1  # question 2: every round lost its image


def test_mmbench_test_split_resume_and_submission(tiny_model_dir, tmp_path, monkeypatch):
    tsv = tmp_path / "mmbench_test.tsv"
    pd.DataFrame(mmbench_rows(with_answers=False)[:2]).to_csv(tsv, sep="\t", index=False)
    reference = tmp_path / "reference.jsonl"
    main(mmbench_args(tiny_model_dir, tsv, reference))

    answers = tmp_path / "answers.jsonl"
    real_answer_batch = generation.answer_batch

    def killed(*args, **kwargs):
        monkeypatch.setattr(generation, "answer_batch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        return real_answer_batch(*args, **kwargs)

    monkeypatch.setattr(generation, "answer_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        main(mmbench_args(tiny_model_dir, tsv, answers))
    assert len(read_answers(answers).records) == 3
    monkeypatch.setattr(generation, "answer_batch", real_answer_batch)
    assert main(mmbench_args(tiny_model_dir, tsv, answers)) == 0
    fields = ("question_id", "round_id")
    assert answers_by_key(answers, fields) == answers_by_key(reference, fields)
    assert len(read_answers(answers).records) == 6
    uploaded = pd.read_excel(tmp_path / "answers.xlsx", engine="openpyxl")
    round_zero = {r["question_id"]: r["text"] for r in read_answers(answers).records if r["round_id"] == 0}
    assert "prediction" in uploaded.columns and "image" not in uploaded.columns
    assert [str(p) if not pd.isna(p) else "" for p in uploaded["prediction"]] == [round_zero[0], round_zero[1]]


def test_resuming_refuses_answers_of_another_model_question_file_or_setting(tiny_model_dir, tmp_path, capsys):
    import shutil

    root = make_textvqa_files(tmp_path, with_missing_image=False)
    answers = tmp_path / "answers.jsonl"
    assert main(textvqa_args(tiny_model_dir, root, answers, "--limit", "2")) == 0
    recorded = json.loads((tmp_path / "answers.jsonl.provenance.json").read_text())
    assert recorded["model"]["path"] == str(tiny_model_dir.resolve())
    assert recorded["questions"]["path"] == str((root / "questions.jsonl").resolve())
    assert recorded["settings"]["max_new_tokens"] == 3
    before = answers.read_text()
    capsys.readouterr()

    # The same run resumes (and finishes the questions --limit left out).
    assert main(textvqa_args(tiny_model_dir, root, answers)) == 0
    assert len(read_answers(answers).records) == 5 and answers.read_text().startswith(before)
    before = answers.read_text()

    other_model = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other_model)
    other_questions = tmp_path / "other"
    make_textvqa_files(other_questions, with_missing_image=False)
    (other_questions / "questions.jsonl").write_text((root / "questions.jsonl").read_text().replace("sign", "board"))
    changed_runs = {
        "model.path": textvqa_args(other_model, root, answers),
        "questions.sha256": [*textvqa_args(tiny_model_dir, root, answers)[:4], "--question-file",
                             str(other_questions / "questions.jsonl"), *textvqa_args(tiny_model_dir, root, answers)[6:]],
        "settings.max_new_tokens: 3 -> 5": [*textvqa_args(tiny_model_dir, root, answers), "--max-new-tokens", "5"],
        "settings.dtype: 'auto' -> 'float32'": [*textvqa_args(tiny_model_dir, root, answers), "--dtype", "float32"],
    }
    for difference, arguments in changed_runs.items():
        assert main(arguments) == 2, difference
        error = capsys.readouterr().err
        assert f"{answers} holds 5 answers from another run (" in error and difference in error
        assert "to start over" in error
        assert answers.read_text() == before  # nothing mixed in, nothing thrown away

    # Answers whose origin is unknown are not resumed either.
    (tmp_path / "answers.jsonl.provenance.json").unlink()
    assert main(textvqa_args(tiny_model_dir, root, answers)) == 2
    assert "no record of what produced them" in capsys.readouterr().err


def test_shards_of_different_models_are_not_merged(tiny_model_dir, tmp_path, capsys):
    import shutil

    root = make_textvqa_files(tmp_path, with_missing_image=False)
    answers = tmp_path / "answers.jsonl"
    other_model = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other_model)
    assert main(textvqa_args(other_model, root, answers, "--num-shards", "2", "--shard-index", "0")) == 0
    assert main(textvqa_args(tiny_model_dir, root, answers, "--num-shards", "2", "--shard-index", "1")) == 2
    assert "answers.shard-0-of-2.jsonl holds 3 answers from another run (model.path" in capsys.readouterr().err
    assert not answers.exists()
