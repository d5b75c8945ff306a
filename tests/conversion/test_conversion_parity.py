"""Converted official stand-in checkpoints reproduce the official PIIP-LLaVA code's outputs.

`tests/fixtures/official-piip/<case>` was written by the official implementation (CPU, fp32,
perturbed weights so that every interaction acts), together with its outputs on fixed inputs.
"""

from __future__ import annotations

import os

import pytest
import sentencepiece
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor

import piip_llava  # noqa: F401  (registers the Auto classes)
from piip_llava.conversion import convert_released_checkpoint
from piip_llava.models.piip_llava import PIIPLlavaForConditionalGeneration

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "official-piip")
OFFICIAL_IMAGE_MARKER = -200  # LLaVA's IMAGE_TOKEN_INDEX in input_ids

# Measured max abs differences (fp32, CPU): clip_clip_deform features 3.4e-7, logits 2.8e-7;
# convnext_femto_clip_deform logits 9.3e-6, features 1.42e-5 (values up to ~1.03). Our fp64 run
# of the femto case differs from our fp32 run by 5e-7 only, so the residual is on the reference
# side; its cause is not identified (see docs/released_checkpoints.md).
TOLERANCES = {
    "clip_clip_deform": {"image_features": 1e-5, "logits": 1e-5},
    "convnext_femto_clip_deform": {"image_features": 2e-5, "logits": 1e-5},
}


@pytest.fixture(scope="module", params=sorted(TOLERANCES))
def converted(request, tmp_path_factory):
    case = request.param
    destination = tmp_path_factory.mktemp(case)
    report = convert_released_checkpoint(os.path.join(FIXTURES, case), destination)
    model, info = PIIPLlavaForConditionalGeneration.from_pretrained(destination, output_loading_info=True)
    return case, destination, model.eval(), info, report


def splice_image_tokens(input_ids: torch.Tensor, image_token_index: int, image_tokens: int) -> torch.Tensor:
    """LLaVA's single -200 image marker -> our run of image tokens, one per image feature."""
    rows = []
    for row in input_ids.tolist():
        position = row.index(OFFICIAL_IMAGE_MARKER)
        rows.append(row[:position] + [image_token_index] * image_tokens + row[position + 1 :])
    return torch.tensor(rows)


def test_loads_without_missing_or_unexpected_keys(converted):
    case, _, _, info, report = converted
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert report.unused == [] and report.missing == []
    expected_dropped = {"clip_clip_deform": 4, "convnext_femto_clip_deform": 4}[case]
    assert len(report.dropped_expected_unused) == expected_dropped  # post-LayerNorms, timm head.norm


def test_reproduces_official_image_features_and_logits(converted):
    case, _, model, _, _ = converted
    reference = load_file(os.path.join(FIXTURES, case, "official_outputs.safetensors"))
    tolerance = TOLERANCES[case]
    image_tokens = reference["image_features"].shape[1]
    assert model.config.num_image_tokens == image_tokens
    input_ids = splice_image_tokens(reference["input_ids"], model.config.image_token_index, image_tokens)
    with torch.no_grad():
        features = torch.stack(model.model.get_image_features(reference["pixel_values"]).pooler_output)
        logits = model(input_ids=input_ids, pixel_values=reference["pixel_values"]).logits
    original_vocab = reference["logits"].shape[-1]
    assert logits.shape[-1] == original_vocab + 1  # <image> appended
    torch.testing.assert_close(features, reference["image_features"], rtol=0, atol=tolerance["image_features"])
    torch.testing.assert_close(logits[..., :original_vocab], reference["logits"], rtol=0, atol=tolerance["logits"])


def test_processor_and_tokenizer(converted):
    case, destination, model, _, _ = converted
    processor = AutoProcessor.from_pretrained(destination)
    assert processor.image_token_id == model.config.image_token_index == 320
    assert processor.num_image_tokens == model.config.num_image_tokens
    assert processor.image_processor.pad_to_square
    assert list(processor.image_processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(processor.image_processor.image_std) == pytest.approx([0.229, 0.224, 0.225])
    spm = sentencepiece.SentencePieceProcessor(model_file=os.path.join(FIXTURES, case, "tokenizer.model"))
    text = "A chat between a curious user and an artificial intelligence assistant. USER: what is it? ASSISTANT:"
    assert processor.tokenizer(text).input_ids == [1] + spm.encode(text)
    prompt = processor.render_conversation(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    )
    assert prompt.endswith("USER: <image>\nWhat is it? ASSISTANT:")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 320
    assert model.generation_config.suppress_tokens == [320]
