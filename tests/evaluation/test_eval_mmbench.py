"""MMBench: option-letter extraction, circular rounds, circular/vanilla scoring, TSV problems, submission."""

import base64
import io
import json

import pandas as pd
import pytest
from PIL import Image

from piip_llava.cli import main
from piip_llava.evaluation.mmbench import (
    extract_option_letter,
    load_mmbench_items,
    mmbench_requests,
    read_mmbench_table,
    score_mmbench,
    submission_frame,
)

OPTIONS = ["cat", "dog", "bird", "black cat"]


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C)", "C"),
        ("B) dog", "B"),
        ("C. bird", "C"),
        ("The answer is D", "D"),
        ("The answer is A.", "A"),
        ("Answer: (B)", "B"),
        ("I think it is B because it barks", "B"),
        ("dog", "B"),  # an option's text
        ("It is a bird.", "C"),  # the only option text contained
        ("black cat", "D"),  # exact text beats containment of "cat"
        ("a cat and a dog", None),  # two options contained: ambiguous
        ("A or B", None),  # two letters: ambiguous
        ("E", None),  # not an option letter
        ("", None),
        (None, None),
    ],
)
def test_extract_option_letter(prediction, letter):
    assert extract_option_letter(prediction, OPTIONS) == letter


def test_lone_article_a_in_a_sentence_is_not_option_a():
    assert extract_option_letter("A large horse stands there", ["cat", "dog"]) is None


def image_base64(color=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, rows):
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def base_rows():
    return [
        {"index": 0, "question": "Which animal?", "hint": "A pet.", "A": "cat", "B": "dog", "C": "bird", "D": None,
         "answer": "B", "category": "recognition", "l2-category": "perception", "image": image_base64(),
         "split": "dev", "source": "s", "comment": None},
        {"index": 1, "question": "Which colour?", "hint": None, "A": "red", "B": "blue", "C": None, "D": None,
         "answer": "A", "category": "colour", "l2-category": "perception", "image": image_base64((0, 0, 255)),
         "split": "dev", "source": "s", "comment": None},
    ]


def test_rounds_rotate_contents_and_keep_letters(tmp_path):
    write_tsv(tmp_path / "dev.tsv", base_rows())
    items, skipped = load_mmbench_items(read_mmbench_table(tmp_path / "dev.tsv"))
    assert skipped == []
    first = [item for item in items if item.question_id == 0]
    assert [item.options for item in first] == [("cat", "dog", "bird"), ("dog", "bird", "cat"), ("bird", "cat", "dog")]
    assert [item.answer for item in first] == ["B", "A", "C"]  # wherever "dog" is shown
    assert [item.option_char for item in first] == [("A", "B", "C"), ("B", "C", "A"), ("C", "A", "B")]
    assert first[0].prompt == "A pet.\nWhich animal?\nA. cat\nB. dog\nC. bird"
    assert len([item for item in items if item.question_id == 1]) == 2


def test_request_carries_llava_instruction_and_fields(tmp_path):
    write_tsv(tmp_path / "dev.tsv", base_rows())
    table = read_mmbench_table(tmp_path / "dev.tsv")
    items, _ = load_mmbench_items(table)
    request = mmbench_requests(table, items)[1]
    assert request.question == (
        "A pet.\nWhich animal?\nA. dog\nB. bird\nC. cat\nAnswer with the option's letter from the given choices directly."
    )
    assert request.record == {"question_id": 0, "round_id": 1, "prompt": "A pet.\nWhich animal?\nA. dog\nB. bird\nC. cat",
                              "options": ["dog", "bird", "cat"], "option_char": ["B", "C", "A"]}
    assert request.load_image().size == (8, 8)


def answers_for(items, wrong=()):
    """Answer records giving the right letter, except for the (question_id, round_id) keys in `wrong`."""
    records = []
    for item in items:
        letters = "ABCD"[: len(item.options)]
        letter = item.answer if item.key not in wrong else next(x for x in letters if x != item.answer)
        records.append({"question_id": item.question_id, "round_id": item.round_id, "text": letter})
    return records


def test_one_wrong_round_fails_the_question_under_circular_only(tmp_path):
    write_tsv(tmp_path / "dev.tsv", base_rows())
    items, _ = load_mmbench_items(read_mmbench_table(tmp_path / "dev.tsv"))
    score = score_mmbench(answers_for(items, wrong={(0, 2)}), items)
    assert (score.circular.correct, score.circular.total) == (1, 2)
    assert (score.vanilla.correct, score.vanilla.total) == (2, 2)
    assert score.accuracy == pytest.approx(50.0)
    assert score.per_category["recognition"]["circular"].correct == 0
    assert score.per_category["colour"]["circular"].correct == 1
    perception = score.per_l2_category["perception"]
    assert (perception["circular"].correct, perception["circular"].total) == (1, 2)
    # Category tallies add up to the overall ones.
    assert sum(t["circular"].total for t in score.per_category.values()) == score.circular.total
    assert sum(t["vanilla"].correct for t in score.per_category.values()) == score.vanilla.correct


def test_predictions_naming_no_option_are_counted_per_category(tmp_path):
    write_tsv(tmp_path / "dev.tsv", base_rows())
    items, _ = load_mmbench_items(read_mmbench_table(tmp_path / "dev.tsv"))
    records = answers_for(items)
    # The original round of the animal question names nothing that is an option; a later round names a wrong one.
    texts = {(0, 0): "a hamster", (0, 1): "cat"}
    for record in records:
        record["text"] = texts.get((record["question_id"], record["round_id"]), record["text"])
    score = score_mmbench(records, items)
    recognition, colour = score.per_category["recognition"], score.per_category["colour"]
    assert (recognition["no_option"].correct, recognition["no_option"].total) == (1, 1)
    assert (colour["no_option"].correct, colour["no_option"].total) == (0, 1)
    assert score.unparsed_predictions == 1
    metrics = score.to_metrics()["per_category"]
    assert metrics["recognition"]["vanilla_no_option_percent"] == pytest.approx(100.0)
    assert metrics["colour"]["vanilla_no_option_percent"] == pytest.approx(0.0)
    assert "| recognition | 0.00 | 0.00 | 100.00 | 1 |" in score.report()


def test_missing_rounds_and_unknown_answers_are_reported(tmp_path):
    write_tsv(tmp_path / "dev.tsv", base_rows())
    items, _ = load_mmbench_items(read_mmbench_table(tmp_path / "dev.tsv"))
    records = [record for record in answers_for(items) if (record["question_id"], record["round_id"]) != (1, 1)]
    records.append({"question_id": 77, "round_id": 0, "text": "A"})
    score = score_mmbench(records, items)
    assert score.incomplete_questions == [1]
    assert score.circular.total == 1
    assert [reason for _, reason in score.unmatched] == ["no such question/round in the TSV"]


def test_rows_already_holding_circular_copies_are_grouped_by_index_modulo_a_million(tmp_path):
    rows = base_rows()[:1]
    copy = dict(rows[0], index=1_000_000, A="dog", B="bird", C="cat", answer="A")
    write_tsv(tmp_path / "legacy.tsv", rows + [copy])
    items, _ = load_mmbench_items(read_mmbench_table(tmp_path / "legacy.tsv"))
    assert len(items) == 2 and {item.group_id for item in items} == {0}
    records = [{"question_id": 0, "round_id": 0, "text": "B"}, {"question_id": 1_000_000, "round_id": 0, "text": "B"}]
    score = score_mmbench(records, items)
    assert (score.vanilla.correct, score.circular.correct, score.circular.total) == (1, 0, 1)


def test_malformed_rows_are_skipped_and_listed(tmp_path):
    rows = base_rows() + [
        dict(base_rows()[1], index=2, answer="D"),  # answer outside the two options
        dict(base_rows()[1], index=3, question=None),
        dict(base_rows()[1], index=4, B=None),  # a single option
    ]
    path = tmp_path / "dev.tsv"
    write_tsv(path, rows)
    with open(path, "a") as handle:  # a line with too many fields
        handle.write("5\tq\th\ta\tb\tc\td\tA\tcat\tl2\timg\tdev\ts\tc\textra\textra\n")
    items, skipped = load_mmbench_items(read_mmbench_table(path))
    assert {item.question_id for item in items} == {0, 1}
    reasons = " | ".join(reason for _, reason in skipped)
    assert len(skipped) == 4
    assert "answer 'D' is not one of the options AB" in reasons
    assert "no question text" in reasons and "only 1 option(s)" in reasons and "malformed TSV line" in reasons


def test_submission_keeps_llava_columns_and_round_zero_prediction(tmp_path):
    rows = [{key: value for key, value in row.items() if key != "answer"} for row in base_rows()]
    write_tsv(tmp_path / "test.tsv", rows)
    table = read_mmbench_table(tmp_path / "test.tsv")
    assert not table.has_answers
    items, _ = load_mmbench_items(table)
    records = [{"question_id": 0, "round_id": 1, "text": "A"}, {"question_id": 0, "round_id": 0, "text": "B"}]
    frame = submission_frame(table, records, items)
    assert list(frame.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "split"]
    assert frame["prediction"].iloc[0] == "B" and pd.isna(frame["prediction"].iloc[1])


def test_score_command_writes_metrics_and_test_split_submission(tmp_path, capsys):
    write_tsv(tmp_path / "dev.tsv", base_rows())
    items, _ = load_mmbench_items(read_mmbench_table(tmp_path / "dev.tsv"))
    result_file = tmp_path / "answers.jsonl"
    result_file.write_text("".join(json.dumps(r) + "\n" for r in answers_for(items, wrong={(1, 1)})))
    metrics_file = tmp_path / "metrics.json"
    status = main(["score", "mmbench", "--question-file", str(tmp_path / "dev.tsv"), "--result-file", str(result_file),
                   "--metrics-file", str(metrics_file)])
    assert status == 0
    assert "Circular accuracy: 50.00%" in capsys.readouterr().out
    metrics = json.loads(metrics_file.read_text())
    assert metrics["accuracy"] == pytest.approx(50.0) and metrics["vanilla_accuracy"] == pytest.approx(100.0)
    assert metrics["samples"] == 2
    assert metrics["per_category"]["colour"]["circular_accuracy"] == pytest.approx(0.0)

    rows = [{key: value for key, value in row.items() if key != "answer"} for row in base_rows()]
    write_tsv(tmp_path / "test.tsv", rows)
    status = main(["score", "mmbench", "--question-file", str(tmp_path / "test.tsv"), "--result-file", str(result_file)])
    assert status == 0
    uploaded = pd.read_excel(tmp_path / "answers.xlsx", engine="openpyxl")
    assert uploaded["prediction"].tolist() == ["B", "A"]


@pytest.fixture
def warnings_logged(caplog):
    """The warnings our loggers write (transformers' logging does not propagate to pytest by default)."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            yield caplog
    finally:
        hf_logging.disable_propagation()


def test_score_command_says_which_result_lines_it_cannot_read(tmp_path, capsys, warnings_logged):
    write_tsv(tmp_path / "dev.tsv", base_rows())
    items, _ = load_mmbench_items(read_mmbench_table(tmp_path / "dev.tsv"))
    lines = [json.dumps(record) for record in answers_for(items)]
    lines.insert(2, "Traceback (most recent call last):")
    result_file = tmp_path / "answers.jsonl"
    result_file.write_text("\n".join(lines) + "\n" + lines[-1][:10])
    metrics_file = tmp_path / "metrics.json"
    status = main(["score", "mmbench", "--question-file", str(tmp_path / "dev.tsv"), "--result-file", str(result_file),
                   "--metrics-file", str(metrics_file)])
    assert status == 0 and "Circular accuracy: 100.00%" in capsys.readouterr().out
    assert "2 line(s) are not JSON answer records and are left out (lines 3, the last)" in warnings_logged.text
    assert json.loads(metrics_file.read_text())["unreadable_lines"] == 2


def test_score_command_warns_that_a_tsv_without_answers_gives_no_accuracy(tmp_path, capsys, warnings_logged):
    rows = [{key: value for key, value in row.items() if key != "answer"} for row in base_rows()]
    write_tsv(tmp_path / "test.tsv", rows)
    result_file = tmp_path / "answers.jsonl"
    result_file.write_text(json.dumps({"question_id": 0, "round_id": 0, "text": "B"}) + "\n")
    metrics_file = tmp_path / "metrics.json"
    status = main(["score", "mmbench", "--question-file", str(tmp_path / "test.tsv"), "--result-file", str(result_file),
                   "--metrics-file", str(metrics_file)])
    assert status == 0
    assert "Accuracy" not in capsys.readouterr().out
    assert f"{tmp_path / 'test.tsv'} has no 'answer' column (a test split?): no accuracy can be computed" in (
        warnings_logged.text)
    assert json.loads(metrics_file.read_text())["accuracy"] is None


def test_missing_question_or_result_files_are_named_in_one_line_errors(tmp_path, capsys):
    write_tsv(tmp_path / "dev.tsv", base_rows())
    assert main(["score", "mmbench", "--question-file", str(tmp_path / "dev.tsv"), "--result-file",
                 str(tmp_path / "absent.jsonl")]) == 2
    assert f"error: Result file {tmp_path / 'absent.jsonl'} does not exist." in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["score", "mmbench", "--question-file", str(tmp_path / "dev.tsv"), "--result-file",
                 str(tmp_path / "empty.jsonl")]) == 2
    assert "holds no answers (it is empty)" in capsys.readouterr().err
    for command in (["eval", "mmbench", "--model-path", str(tmp_path), "--answers-file", str(tmp_path / "a.jsonl")],
                    ["score", "mmbench", "--result-file", str(tmp_path / "a.jsonl")]):
        assert main([*command, "--question-file", str(tmp_path / "mmbench_dev.tsv")]) == 2
        assert capsys.readouterr().err == f"error: MMBench question file {tmp_path / 'mmbench_dev.tsv'} does not exist.\n"
    assert main(["eval", "textvqa", "--model-path", str(tmp_path), "--answers-file", str(tmp_path / "a.jsonl"),
                 "--question-file", str(tmp_path / "questions.jsonl"), "--image-folder", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: TextVQA question file {tmp_path / 'questions.jsonl'} does not exist.\n"
