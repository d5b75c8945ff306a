"""The demo recipe's evaluation steps: the larger held-out split, and text questions scored by what is written."""

import json

import pytest
from demo_recipe.pipeline import Recipe, evaluate_on_larger_split, text_scores_by_kind

from piip_llava.evaluation.mmbench import load_mmbench_items, read_mmbench_table
from piip_llava.evaluation.textvqa import questions_from_jsonl
from piip_llava.synthetic import export_dataset


def test_a_larger_check_split_of_another_size_is_refused_not_silently_reused(tmp_path):
    data_dir = tmp_path / "large_check" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "stats.json").write_text(json.dumps({"eval": {"images": 12}}))
    with pytest.raises(ValueError, match="holds a 12-image split, not 600"):
        evaluate_on_larger_split(tmp_path, tmp_path / "eval", tmp_path / "model", Recipe(), 600)


def test_text_scores_split_words_from_numbers_with_the_harness_scorers(tmp_path):
    export_dataset(tmp_path / "data", seed=1, num_train_images=0, num_eval_images=48, progress=False)
    splits, eval_dir = tmp_path / "data" / "eval", tmp_path / "eval"
    eval_dir.mkdir()
    data = json.loads((splits / "textvqa_annotations.json").read_text())["data"]
    written = {entry["image_id"]: entry["answers"][0] for entry in data}
    # Words answered right, numbers wrong: in the open format, and in MMBench with a reply that names no option.
    loaded = questions_from_jsonl(splits / "textvqa_questions.jsonl", tmp_path / "data" / "images")
    records = [dict(request.record, text=written[request.record["question_id"]] if not
                    written[request.record["question_id"]].isdigit() else "0") for request in loaded.requests]
    (eval_dir / "textvqa_answers.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    items, _ = load_mmbench_items(read_mmbench_table(splits / "mmbench_dev.tsv"))

    def replies(numbers_right: bool) -> str:
        lines = []
        for item in items:
            right = item.options["ABCD".index(item.answer)]
            text = right if numbers_right or not right.isdigit() else "none"
            lines.append(json.dumps({"question_id": item.question_id, "round_id": item.round_id, "text": text}) + "\n")
        return "".join(lines)

    (eval_dir / "mmbench_answers.jsonl").write_text(replies(numbers_right=False))
    (eval_dir / "mmbench_likelihood_answers.jsonl").write_text(replies(numbers_right=True))

    scores = text_scores_by_kind(eval_dir, splits)
    types = json.loads((splits / "question_types.json").read_text())
    for question_type in ("text_small", "text_large"):
        open_format = scores["textvqa"][question_type]
        assert set(open_format) == {"words", "numbers"}
        assert (open_format["words"]["accuracy"], open_format["numbers"]["accuracy"]) == (100.0, 0.0)
        assert sum(kind["samples"] for kind in open_format.values()) == list(types.values()).count(question_type)
        choice, likely = scores["mmbench"][question_type], scores["mmbench_likelihood"][question_type]
        assert choice["words"]["vanilla_accuracy"] == choice["words"]["circular_accuracy"] == 100.0
        assert choice["numbers"]["vanilla_accuracy"] == 0.0 and choice["numbers"]["vanilla_no_option_percent"] == 100.0
        assert likely["numbers"]["vanilla_accuracy"] == likely["numbers"]["circular_accuracy"] == 100.0
        questions = sum(item.is_original and item.category == question_type for item in items)
        assert choice["words"]["questions"] + choice["numbers"]["questions"] == questions
