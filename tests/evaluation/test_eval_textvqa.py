"""TextVQA scoring: the EvalAI normalisation rules, the VQA accuracy, and LLaVA's result matching."""

import json

import pytest

from piip_llava.cli import main
from piip_llava.evaluation.answer_normalization import normalize_answer, strip_punctuation, vqa_accuracy
from piip_llava.evaluation.textvqa import question_from_prompt, score_textvqa, with_answer_instruction


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("The Cat", "cat"),  # lower-case, article dropped
        ("an apple a day", "apple day"),
        ("Two dogs", "2 dogs"),  # number words to digits
        ("none", "0"),
        ("dont", "don't"),  # contractions restored
        ("youre right", "you're right"),
        ("Im", "im"),  # capitalised keys never match the lower-cased text
        ("1,000", "1000"),  # commas vanish before the punctuation step
        ("red, white", "red white"),
        ("coca-cola", "coca cola"),  # a mark inside a word becomes a space
        ("x - y", "x y"),  # a mark touching a space is deleted
        ("hello!", "hello"),
        ("(sale)", "sale"),
        ("what?", "what"),
        ("end.", "end"),  # period not followed by a digit is removed
        ("3.5", "3.5"),  # decimal point survives
        ("it's", "it 's"),  # possessive split off
        ("Hello\nWorld\tagain", "hello world again"),
        ("  STOP  ", "stop"),
    ],
)
def test_normalize_answer_rules(raw, normal):
    assert normalize_answer(raw) == normal


def test_comma_between_digits_deletes_marks_instead_of_spacing():
    # On its own the punctuation step honours the number-comma rule: every mark is deleted, not spaced.
    assert strip_punctuation("1,000-2") == "10002"
    assert strip_punctuation("a-b") == "a b"


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matches, expected):
    answers = ["stop"] * matches + ["go"] * (10 - matches)
    assert vqa_accuracy("Stop.", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides_and_rejects_empty_answers():
    assert vqa_accuracy("two", ["2"] * 3 + ["x"] * 7) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("a", [])


def test_question_from_prompt_follows_llava_formats():
    assert question_from_prompt("What Brand?\nReference OCR token: A, B\nAnswer briefly.") == "what brand?"
    assert question_from_prompt("Reference OCR token: A\nWhat Brand?\nAnswer briefly.") == "what brand?"
    assert question_from_prompt("What Brand?\nAnswer briefly.") == "what brand?"
    assert question_from_prompt("OCR tokens: a. Question: What Brand? Short answer:") == "what brand?"
    assert question_from_prompt("no instruction line") is None


def test_answer_instruction_is_added_once():
    once = with_answer_instruction("what?")
    assert once == "what?\nAnswer the question using a single word or phrase."
    assert with_answer_instruction(once) == once


ANNOTATIONS = {
    ("img1", "what brand?"): ["dakota"] * 10,
    ("img2", "what number?"): ["12"] * 3 + ["21"] * 7,
}


def test_score_textvqa_matches_by_image_id_and_question():
    records = [
        {"question_id": "img1", "prompt": "What brand?\nReference OCR token: dakota\nAnswer...", "text": "Dakota"},
        {"question_id": "img2", "prompt": "What number?\nAnswer...", "text": "12"},
        {"question_id": "img9", "prompt": "Who?\nAnswer...", "text": "me"},
        {"question_id": "img2", "prompt": "one line only", "text": "21"},
    ]
    score = score_textvqa(records, ANNOTATIONS)
    assert score.samples == 2
    assert score.accuracy == pytest.approx(100 * (1.0 + 0.9) / 2)
    assert [qid for qid, _ in score.unmatched] == ["img9", "img2"]
    assert score.report() == f"Samples: 2\nAccuracy: {score.accuracy:.2f}%\nLeft out: 2 result(s) matching no annotation\n"


def test_empty_prediction_scores_zero_and_is_counted():
    records = [
        {"question_id": "img1", "prompt": "What brand?\nAnswer...", "text": ""},
        {"question_id": "img2", "prompt": "What number?\nAnswer...", "text": "21"},
    ]
    score = score_textvqa(records, ANNOTATIONS)
    assert score.samples == 2 and score.empty_predictions == 1
    assert score.accuracy == pytest.approx(50.0)


def write_annotation_file(path, entries):
    data = [
        {"image_id": image_id, "question": question.capitalize(), "question_id": n, "answers": answers}
        for n, ((image_id, question), answers) in enumerate(entries.items())
    ]
    path.write_text(json.dumps({"dataset_name": "textvqa", "data": data}))


def test_score_command_prints_llava_lines_and_writes_metrics(tmp_path, capsys):
    annotation_file = tmp_path / "TextVQA_0.5.1_val.json"
    write_annotation_file(annotation_file, ANNOTATIONS)
    result_file = tmp_path / "answers.jsonl"
    lines = [
        {"question_id": "img1", "prompt": "What brand?\nAnswer the question using a single word or phrase.",
         "text": "dakota"},
        {"question_id": "img2", "prompt": "What number?\nAnswer the question using a single word or phrase.",
         "text": "twelve"},
        {"question_id": "unknown", "prompt": "What?\nAnswer the question using a single word or phrase.", "text": "x"},
    ]
    result_file.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"question_id": "img')
    metrics_file = tmp_path / "metrics.json"
    status = main(["score", "textvqa", "--annotation-file", str(annotation_file), "--result-file", str(result_file),
                   "--metrics-file", str(metrics_file)])
    output = capsys.readouterr().out
    assert "Samples: 2\nAccuracy: 50.00%" in output  # "twelve" is not a number word the rules know
    assert status == 1  # one result matches no annotation: reported, not silently averaged
    metrics = json.loads(metrics_file.read_text())
    assert metrics["accuracy"] == pytest.approx(50.0)
    assert metrics["samples"] == 2
    assert metrics["unmatched_results"] == 1
    assert metrics["unmatched_examples"][0]["question_id"] == "unknown"


def test_duplicate_answers_count_once_per_annotation_entry_and_missing_answers_are_reported():
    annotations = load_annotations_from(
        [("img1", "What brand?", ["dakota"] * 10), ("img2", "What number?", ["12"] * 10),
         ("img2", "What number?", ["12"] * 10), ("img3", "Who?", ["me"] * 10)]
    )
    brand = {"question_id": "img1", "prompt": "What brand?\nAnswer...", "text": "dakota"}
    number = {"question_id": "img2", "prompt": "What number?\nAnswer...", "text": "12"}
    # img1 answered three times (wrongly after the first), img2 twice as the file asks it twice, img3 never.
    records = [brand, {**brand, "text": "x"}, {**brand, "text": "y"}, number, number]
    score = score_textvqa(records, annotations)
    assert score.samples == 3 and score.accuracy == pytest.approx(100.0)
    assert [reason.split(" for")[0] for _, reason in score.unmatched] == ["duplicate answer", "duplicate answer"]
    assert score.annotations_without_result == 1
    assert score.report() == (
        "Samples: 3\nAccuracy: 100.00%\nLeft out: 2 duplicate answer(s) to questions already answered\n"
        "Missing: 1 annotated question(s) have no answer; the accuracy is over the answered ones\n"
    )


def load_annotations_from(entries):
    from piip_llava.evaluation.textvqa import TextVQAAnnotations

    annotations = TextVQAAnnotations()
    for image_id, question, answers in entries:
        annotations[(image_id, question.lower())] = answers
        annotations.entries[(image_id, question.lower())] += 1
    return annotations


def score_args(annotation_file, result_file):
    return ["score", "textvqa", "--annotation-file", str(annotation_file), "--result-file", str(result_file)]


def test_score_command_refuses_a_missing_or_empty_result_file(tmp_path, capsys):
    annotation_file = tmp_path / "TextVQA_0.5.1_val.json"
    write_annotation_file(annotation_file, ANNOTATIONS)
    assert main(score_args(annotation_file, tmp_path / "absent.jsonl")) == 2
    assert f"error: Result file {tmp_path / 'absent.jsonl'} does not exist." in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert main(score_args(annotation_file, tmp_path / "empty.jsonl")) == 2
    assert "holds no answers (it is empty)" in capsys.readouterr().err
    (tmp_path / "garbage.jsonl").write_text("not json\n[1, 2]\n")
    assert main(score_args(annotation_file, tmp_path / "garbage.jsonl")) == 2
    assert "holds no answers (2 unreadable line(s))" in capsys.readouterr().err
    assert main(score_args(tmp_path / "absent.json", tmp_path / "garbage.jsonl")) == 2
    assert f"annotation file {tmp_path / 'absent.json'} does not exist" in capsys.readouterr().err
    assert "Accuracy" not in capsys.readouterr().out


def test_score_command_prints_duplicates_and_missing_answers(tmp_path, capsys):
    annotation_file = tmp_path / "TextVQA_0.5.1_val.json"
    write_annotation_file(annotation_file, ANNOTATIONS)
    answer = {"question_id": "img1", "prompt": "What brand?\nAnswer the question using a single word or phrase.",
              "text": "dakota"}
    (tmp_path / "answers.jsonl").write_text(json.dumps(answer) + "\n" + json.dumps({**answer, "text": "no"}) + "\n")
    status = main(score_args(annotation_file, tmp_path / "answers.jsonl"))
    output = capsys.readouterr().out
    assert status == 1
    assert "Samples: 1\nAccuracy: 100.00%\nLeft out: 1 duplicate answer(s)" in output
    assert "Missing: 1 annotated question(s) have no answer" in output
