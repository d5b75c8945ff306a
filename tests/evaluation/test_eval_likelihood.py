"""Answering multiple choice by likelihood: the scores are the model's own reply probabilities, batching and
padding do not change them, and `piip-llava eval mmbench --answer-by likelihood` writes, scores and resumes."""

import json
import math

import pandas as pd
import pytest
import torch
from PIL import Image
from test_eval_end_to_end import mmbench_args, mmbench_rows

from piip_llava.cli import main
from piip_llava.evaluation.answers_file import read_answers
from piip_llava.evaluation.generation import load_model_and_processor
from piip_llava.evaluation.likelihood import (
    conversation_with_reply,
    most_likely_replies,
    reply_log_likelihoods,
    reply_token_ids,
)
from piip_llava.evaluation.prompts import chat_prompt


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_model_and_processor(str(tiny_model_dir), device="cpu")


def reply_ids_of(processor, question, reply):
    prompt_ids = processor.tokenizer(chat_prompt(processor, question), add_special_tokens=False)["input_ids"]
    return reply_token_ids(processor.tokenizer, prompt_ids, conversation_with_reply(processor, question, reply))


def whole_conversation_log_likelihood(model, processor, question, image, reply) -> float:
    """The reference: one unpadded row holding the whole conversation, its reply tokens' log-probabilities summed."""
    count = len(reply_ids_of(processor, question, reply))
    inputs = processor(text=[conversation_with_reply(processor, question, reply)], images=[image], return_tensors="pt")
    with torch.no_grad():
        log_probabilities = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)
    targets = inputs["input_ids"][0, -count:]
    return log_probabilities[-count - 1 : -1].gather(-1, targets.unsqueeze(-1)).sum().item()


def test_cached_batched_scores_equal_each_whole_conversation_scored_alone(tiny_model, rgb_image):
    model, processor = tiny_model
    other_image = rgb_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Prompts of different lengths (left padding in the prompt pass) and replies of different lengths (right
    # padding in the reply pass); two questions, two images, one call.
    questions = ["Which animal is in the picture, and where?\nA. cat\nB. elephant", "What is it?"]
    replies = [["cat", "an elephant on the left", "B"], ["dog", "a red circle"]]
    images = [rgb_image, other_image]
    batched = reply_log_likelihoods(model, processor, questions, images, replies)
    assert [len(scores) for scores in batched] == [3, 2]
    for question, image, choices, scores in zip(questions, images, replies, batched):
        reference = [whole_conversation_log_likelihood(model, processor, question, image, reply) for reply in choices]
        assert scores == pytest.approx(reference, abs=1e-4)
        assert all(score < 0 for score in scores)
    chosen = most_likely_replies(model, processor, questions, images, replies)
    for (reply, scores), choices, batched_scores in zip(chosen, replies, batched):
        assert scores == pytest.approx(batched_scores, abs=1e-5)
        assert reply == choices[max(range(len(choices)), key=batched_scores.__getitem__)]


def test_a_reply_score_is_the_sum_of_its_tokens_log_probabilities_with_the_end_marker(tiny_model, rgb_image):
    model, processor = tiny_model
    prompt, full = chat_prompt(processor, "What is it?"), conversation_with_reply(processor, "What is it?", "cat")
    assert full.startswith(prompt) and full.endswith("</s>")
    reply_ids = reply_ids_of(processor, "What is it?", "cat")
    assert processor.tokenizer.convert_ids_to_tokens(reply_ids)[-1] == "</s>"
    # Score token by token from the prompt alone, feeding each reply token back, as generation would.
    inputs = processor(text=[prompt], images=[rgb_image], return_tensors="pt")
    total = 0.0
    with torch.no_grad():
        for token in reply_ids:
            logits = model(**inputs).logits[0, -1]
            total += torch.log_softmax(logits.float(), dim=-1)[token].item()
            inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    score = reply_log_likelihoods(model, processor, ["What is it?"], [rgb_image], [["cat"]])[0][0]
    assert score == pytest.approx(total, abs=1e-4)


def test_a_template_whose_reply_does_not_extend_the_prompt_is_refused(tiny_model):
    _, processor = tiny_model
    with pytest.raises(ValueError, match="does not extend the generation prompt"):
        prompt_ids = processor.tokenizer("USER: hi ASSISTANT: yes", add_special_tokens=False)["input_ids"]
        reply_token_ids(processor.tokenizer, prompt_ids, "USER: hi ASSISTANT:")


def test_right_padding_is_refused(tiny_model_dir, rgb_image):
    model, processor = load_model_and_processor(str(tiny_model_dir), device="cpu")
    processor.tokenizer.padding_side = "right"
    with pytest.raises(ValueError, match="pad on the left"):
        reply_log_likelihoods(model, processor, ["What is it?"], [rgb_image], [["cat", "dog"]])


def test_mmbench_by_likelihood_answers_every_round_with_an_option_and_scores_it(tiny_model_dir, tmp_path, capsys):
    tsv = tmp_path / "mmbench_dev.tsv"
    pd.DataFrame(mmbench_rows()[:2]).to_csv(tsv, sep="\t", index=False)
    answers, metrics_file = tmp_path / "answers.jsonl", tmp_path / "metrics.json"
    status = main(mmbench_args(tiny_model_dir, tsv, answers, "--answer-by", "likelihood", "--metrics-file",
                               str(metrics_file)))
    assert status == 0
    records = read_answers(answers).records
    assert [(record["question_id"], record["round_id"]) for record in records] == [
        (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    for record in records:
        metadata = record["metadata"]
        assert metadata["answer_by"] == "likelihood" and metadata["choices"] == record["options"]
        best = max(range(len(record["options"])), key=metadata["log_likelihoods"].__getitem__)
        assert record["text"] == record["options"][best]
        assert all(math.isfinite(score) for score in metadata["log_likelihoods"])
    metrics = json.loads(metrics_file.read_text())
    # Every reply is an option's text, so every reply names an option.
    assert all(category["vanilla_no_option_percent"] == 0 for category in metrics["per_category"].values())
    assert "Circular accuracy:" in capsys.readouterr().out


def test_mmbench_by_letter_likelihood_replies_with_letters(tiny_model_dir, tmp_path):
    tsv = tmp_path / "mmbench_dev.tsv"
    pd.DataFrame(mmbench_rows()[1:2]).to_csv(tsv, sep="\t", index=False)
    answers = tmp_path / "answers.jsonl"
    assert main(mmbench_args(tiny_model_dir, tsv, answers, "--answer-by", "likelihood", "--likelihood-target",
                             "letter")) == 0
    records = read_answers(answers).records
    assert [record["metadata"]["choices"] for record in records] == [["A", "B"], ["A", "B"]]
    assert all(record["text"] in ("A", "B") for record in records)


def test_an_answers_file_is_never_resumed_with_the_other_method(tiny_model_dir, tmp_path, capsys):
    tsv = tmp_path / "mmbench_dev.tsv"
    pd.DataFrame(mmbench_rows()[1:2]).to_csv(tsv, sep="\t", index=False)
    answers = tmp_path / "answers.jsonl"
    arguments = mmbench_args(tiny_model_dir, tsv, answers, "--limit", "1")
    assert main(arguments) == 0
    before = answers.read_text()
    assert main([*arguments, "--answer-by", "likelihood"]) == 2
    assert "settings.answer_by: 'generation' -> 'likelihood'" in capsys.readouterr().err
    assert answers.read_text() == before


def test_the_bundled_model_prefers_the_written_word_among_look_alikes():
    from test_demo_model import EXAMPLES_DIR

    from piip_llava.chat_session import BUNDLED_MODEL_DIR

    model, processor = load_model_and_processor(str(BUNDLED_MODEL_DIR), device="cpu")
    question = "What is written in the image?\nA. SALE\nB. SUN\nC. SHIP\nD. STOP"
    with Image.open(EXAMPLES_DIR / "example_shapes.png") as image:
        [(reply, scores)] = most_likely_replies(model, processor, [question], [image.convert("RGB")],
                                                [["SALE", "SUN", "SHIP", "STOP"]])
    assert reply == "SUN" and len(scores) == 4
