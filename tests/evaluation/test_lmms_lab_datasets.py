"""TextVQA and MMBench as lmms-lab's Hugging Face datasets: `piip-llava synthetic --lmms-lab` writes them,
`piip-llava eval/score --dataset` reads them (parquet or save_to_disk) and scores exactly as from LLaVA's files,
and our lmms-eval task functions (no lmms-eval needed to run them) score as `piip-llava score` does.
"""

import io
import json

import datasets
import pytest
from PIL import Image

from piip_llava.cli import main
from piip_llava.commands.lmms import answer_records_from_samples
from piip_llava.evaluation.answers_file import read_answers
from piip_llava.evaluation.lmms import task_functions
from piip_llava.evaluation.lmms.task_files import MMBENCH_TASK, TEXTVQA_TASK, dataset_source
from piip_llava.evaluation.mmbench import load_mmbench_items, read_mmbench_table, score_mmbench
from piip_llava.evaluation.textvqa import load_annotations, score_textvqa
from piip_llava.synthetic.export import export_dataset

EVAL_IMAGES = 6


@pytest.fixture(scope="module")
def synthetic_eval(tmp_path_factory):
    """Six evaluation images in LLaVA's files and in lmms-lab's schemas (no training split)."""
    root = tmp_path_factory.mktemp("synthetic")
    export_dataset(root, seed=3, num_train_images=0, num_eval_images=EVAL_IMAGES, image_size=64, progress=False,
                   lmms_lab=True)
    return root


def metrics_of(argv, tmp_path, name):
    metrics_file = tmp_path / f"{name}.json"
    assert main([*argv, "--metrics-file", str(metrics_file)]) == 0
    return json.loads(metrics_file.read_text())


def test_synthetic_writes_the_lmms_lab_schemas(synthetic_eval):
    textvqa = datasets.load_dataset("parquet", data_files=str(synthetic_eval / "eval/lmms-lab/textvqa/*.parquet"),
                                    split="train")
    mmbench = datasets.load_dataset("parquet", data_files=str(synthetic_eval / "eval/lmms-lab/mmbench/*.parquet"),
                                    split="train")
    assert {"image_id", "question_id", "question", "image", "answers", "ocr_tokens"} <= set(textvqa.column_names)
    assert {"index", "question", "hint", "A", "B", "C", "D", "answer", "category", "L2-category", "image",
            "source", "comment", "split"} <= set(mmbench.column_names)
    assert isinstance(textvqa.features["image"], datasets.Image) and isinstance(mmbench.features["image"], datasets.Image)
    annotations = load_annotations(synthetic_eval / "eval/textvqa_annotations.json")
    row = textvqa[0]
    assert annotations[(row["image_id"], row["question"].lower())] == row["answers"]
    assert row["image"].size == (64, 64) and len(textvqa) == len(mmbench) == EVAL_IMAGES


def test_textvqa_from_the_lmms_lab_dataset_scores_as_from_llava_files(tiny_model_dir, synthetic_eval, tmp_path):
    eval_dir = synthetic_eval / "eval"
    common = ["--model-path", str(tiny_model_dir), "--max-new-tokens", "3", "--batch-size", "4"]
    from_files = metrics_of(["eval", "textvqa", *common, "--question-file", str(eval_dir / "textvqa_questions.jsonl"),
                             "--image-folder", str(synthetic_eval / "images"), "--annotation-file",
                             str(eval_dir / "textvqa_annotations.json"), "--answers-file", str(tmp_path / "a.jsonl")],
                            tmp_path, "files")
    # No annotation file: the dataset's own answers column scores it.
    from_dataset = metrics_of(["eval", "textvqa", *common, "--dataset", str(eval_dir / "lmms-lab/textvqa"),
                               "--answers-file", str(tmp_path / "b.jsonl")], tmp_path, "dataset")
    assert from_dataset["samples"] == from_files["samples"] == EVAL_IMAGES
    assert from_dataset["accuracy"] == from_files["accuracy"]
    assert [r["text"] for r in read_answers(tmp_path / "a.jsonl").records] == \
        [r["text"] for r in read_answers(tmp_path / "b.jsonl").records]
    rescored = metrics_of(["score", "textvqa", "--dataset", str(eval_dir / "lmms-lab/textvqa"), "--result-file",
                           str(tmp_path / "b.jsonl")], tmp_path, "rescored")
    assert rescored["accuracy"] == from_files["accuracy"] and rescored["unmatched_results"] == 0


def test_mmbench_from_the_lmms_lab_dataset_saved_to_disk_scores_as_from_the_tsv(tiny_model_dir, synthetic_eval,
                                                                               tmp_path):
    eval_dir = synthetic_eval / "eval"
    saved = tmp_path / "mmbench_saved"
    parquet = datasets.load_dataset("parquet", data_files=str(eval_dir / "lmms-lab/mmbench/*.parquet"), split="train")
    datasets.DatasetDict({"dev": parquet}).save_to_disk(str(saved))
    common = ["--model-path", str(tiny_model_dir), "--max-new-tokens", "3", "--batch-size", "4"]
    from_tsv = metrics_of(["eval", "mmbench", *common, "--question-file", str(eval_dir / "mmbench_dev.tsv"),
                           "--answers-file", str(tmp_path / "a.jsonl")], tmp_path, "tsv")
    from_dataset = metrics_of(["eval", "mmbench", *common, "--dataset", str(saved), "--answers-file",
                               str(tmp_path / "b.jsonl")], tmp_path, "dataset")
    assert from_dataset["rounds_scored"] == from_tsv["rounds_scored"] == 4 * EVAL_IMAGES
    for name in ("circular_accuracy", "vanilla_accuracy", "per_category"):
        assert from_dataset[name] == from_tsv[name]


def lmms_lab_textvqa_rows(count=4):
    rows = []
    for n in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (20, 16), (60 * n, 90, 200)).save(buffer, format="PNG")
        rows.append({"image_id": f"img{n}", "question_id": n, "question": f"what number is {n}?",
                     "image": {"bytes": buffer.getvalue(), "path": None}, "answers": [str(n)] * 10})
    return rows


def write_textvqa_parquet(rows, path):
    features = datasets.Features({"image_id": datasets.Value("string"), "question_id": datasets.Value("int32"),
                                  "question": datasets.Value("string"), "image": datasets.Image(),
                                  "answers": datasets.Sequence(datasets.Value("string"))})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


def test_an_undecodable_image_is_skipped_naming_its_row_and_the_rest_is_scored(tiny_model_dir, tmp_path):
    rows = lmms_lab_textvqa_rows()
    rows[2]["image"] = {"bytes": b"not an image at all", "path": None}
    write_textvqa_parquet(rows, tmp_path / "validation-00000-of-00001.parquet")
    metrics = metrics_of(["eval", "textvqa", "--model-path", str(tiny_model_dir), "--dataset", str(tmp_path),
                          "--answers-file", str(tmp_path / "answers.jsonl"), "--max-new-tokens", "2",
                          "--batch-size", "2"], tmp_path, "metrics")
    assert metrics["samples"] == 3 and metrics["skipped_inputs"] == 1
    assert "row 2" in metrics["skipped_examples"][0]["reason"]
    assert [r["question_id"] for r in read_answers(tmp_path / "answers.jsonl").records] == ["img0", "img1", "img3"]


def test_an_mmbench_row_with_a_broken_image_is_skipped_and_the_other_questions_scored(tiny_model_dir, synthetic_eval,
                                                                                    tmp_path):
    split = datasets.load_dataset("parquet", data_files=str(synthetic_eval / "eval/lmms-lab/mmbench/*.parquet"),
                                  split="train", features=None)
    rows = split.cast_column("image", datasets.Image(decode=False)).to_list()
    rows[1]["image"] = {"bytes": b"\x89PNG broken", "path": None}
    datasets.Dataset.from_list(rows, features=split.features).to_parquet(str(tmp_path / "dev.parquet"))
    metrics = metrics_of(["eval", "mmbench", "--model-path", str(tiny_model_dir), "--dataset", str(tmp_path / "dev.parquet"),
                          "--answers-file", str(tmp_path / "answers.jsonl"), "--max-new-tokens", "2",
                          "--batch-size", "4"], tmp_path, "metrics")
    assert metrics["skipped_inputs"] == 4  # the four rounds of the broken row's question
    assert all("row 1:" in example["reason"] for example in metrics["skipped_examples"])
    assert metrics["samples"] == EVAL_IMAGES - 1 and metrics["unanswered_questions"] == 1


def test_a_missing_column_is_a_clear_error_naming_it(tiny_model_dir, tmp_path, capsys):
    rows = [{key: value for key, value in row.items() if key != "question"} for row in lmms_lab_textvqa_rows()]
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "t.parquet"))
    status = main(["eval", "textvqa", "--model-path", str(tiny_model_dir), "--dataset", str(tmp_path / "t.parquet"),
                   "--answers-file", str(tmp_path / "answers.jsonl")])
    assert status == 2
    error = capsys.readouterr().err
    assert "lacks column(s) ['question']" in error and "'image_id'" in error
    assert not (tmp_path / "answers.jsonl").exists()


def test_mmbench_task_functions_score_the_rotated_rounds_as_our_scorer(synthetic_eval):
    """lmms-eval's documents are our circular rounds; the task's aggregation equals score_mmbench on the TSV."""
    eval_dir = synthetic_eval / "eval"
    split = datasets.load_dataset("parquet", data_files=str(eval_dir / "lmms-lab/mmbench/*.parquet"), split="train")
    documents = task_functions.mmbench_process_docs(split)
    assert len(documents) == 4 * EVAL_IMAGES
    table = read_mmbench_table(eval_dir / "mmbench_dev.tsv")
    items, _ = load_mmbench_items(table)
    # Answer the first question right in every round, everything else "A".
    replies = [doc["answer"] if doc["question_id"] == 0 else "A" for doc in documents]
    results = [task_functions.mmbench_process_results(doc, [reply]) for doc, reply in zip(documents, replies)]
    assert task_functions.mmbench_doc_to_text(documents[1]) == \
        f"{items[1].prompt}\nAnswer with the option's letter from the given choices directly."
    records = answer_records_from_samples([json.dumps(result) for result in results], "samples")
    ours = score_mmbench(records, items)
    circular = task_functions.mmbench_circular_accuracy([result["circular_accuracy"] for result in results])
    vanilla = task_functions.mmbench_vanilla_accuracy([result["vanilla_accuracy"] for result in results])
    assert (circular, vanilla) == (ours.circular.accuracy, ours.vanilla.accuracy)
    assert circular >= 100.0 / EVAL_IMAGES


def test_textvqa_task_functions_score_as_our_scorer(synthetic_eval):
    eval_dir = synthetic_eval / "eval"
    split = datasets.load_dataset("parquet", data_files=str(eval_dir / "lmms-lab/textvqa/*.parquet"), split="train")
    documents = task_functions.textvqa_process_docs(split)
    replies = [doc["answers"][0] if n % 2 == 0 else "nothing" for n, doc in enumerate(documents)]
    results = [task_functions.textvqa_process_results(doc, [reply]) for doc, reply in zip(documents, replies)]
    records = answer_records_from_samples([json.dumps(result) for result in results], "samples")
    ours = score_textvqa(records, load_annotations(eval_dir / "textvqa_annotations.json"))
    assert task_functions.textvqa_accuracy([result["accuracy"] for result in results]) == ours.accuracy
    assert ours.samples == EVAL_IMAGES and ours.accuracy == pytest.approx(50.0)


def test_task_files_name_the_local_dataset_in_each_form(synthetic_eval, tmp_path):
    parquet_dir = synthetic_eval / "eval/lmms-lab/textvqa"
    source = dataset_source(parquet_dir, TEXTVQA_TASK.default_split)
    assert source["dataset_path"] == "parquet" and source["test_split"] == "validation"
    assert source["dataset_kwargs"]["data_files"]["validation"][0].endswith("validation-00000-of-00001.parquet")
    split = datasets.load_dataset("parquet", data_files=str(parquet_dir / "*.parquet"), split="train")
    split.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"dev": split}).save_to_disk(str(tmp_path / "dict"))
    assert dataset_source(tmp_path / "single", "validation")["dataset_path"] == "arrow"
    assert dataset_source(tmp_path / "dict", "dev")["dataset_kwargs"] == {"load_from_disk": True}
    for language in ("en", "cn"):
        split.to_parquet(str(tmp_path / "MMBench" / language / "dev-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"several folders \['cn', 'en'\]; give the one folder"):
        dataset_source(tmp_path / "MMBench", "dev")
    assert dataset_source(tmp_path / "MMBench" / "en", "dev")["dataset_kwargs"]["data_files"]["dev"] == \
        [str(tmp_path / "MMBench" / "en" / "dev-00000-of-00001.parquet")]
    with pytest.raises(ValueError, match="no split 'validation'"):
        dataset_source(tmp_path / "dict", MMBENCH_TASK.default_split.replace("dev", "validation"))
