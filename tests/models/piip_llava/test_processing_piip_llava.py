"""PIIP-LLaVA processor, chat templates, Auto classes and pipeline, bad images."""

from __future__ import annotations

import copy
import io

import jinja2
import pytest
import torch
from conftest import build_tiny_llava
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from piip_llava import PIIPLlavaForConditionalGeneration, PIIPLlavaProcessor
from piip_llava.chat_session import ChatSession
from piip_llava.conversation import PLAIN, VICUNA_V1, jinja_chat_template

IMAGE_MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And the square?"},
]


def test_vicuna_template_is_byte_identical_to_the_released_format(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    rendered = processor.apply_chat_template(IMAGE_MESSAGES, add_generation_prompt=True, tokenize=False)
    expected = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat colour is the circle? "
        "ASSISTANT: Red.</s>USER: And the square? ASSISTANT:"
    )
    assert rendered == expected
    assert VICUNA_V1.render(IMAGE_MESSAGES, add_generation_prompt=True) == expected


def test_plain_template_is_placeholder_then_caption_then_newline(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}]},
        {"role": "assistant", "content": "A red circle on white."},
    ]
    _, processor = build_tiny_llava(tokenizer, conversation_format="plain")
    assert processor.apply_chat_template(messages, tokenize=False) == "<image>A red circle on white.\n"
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = environment.from_string(jinja_chat_template(PLAIN))
    assert template.render(messages=messages) == PLAIN.render(messages)


def test_tokenizer_own_template_is_used_without_a_conversation_format(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    own_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] if m['content'] is string else "
    own_template += "m['content'][-1]['text'] }}{% endfor %}"
    tokenizer.chat_template = own_template
    _, processor = build_tiny_llava(tokenizer, conversation_format=None)
    rendered = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<user>hi"


@pytest.mark.parametrize("model_dir", ["tiny", "bundled"])
def test_asking_for_an_answer_without_an_image_is_refused_unless_text_only_is_allowed(model_dir, tiny_model_dir):
    from piip_llava.chat_session import BUNDLED_MODEL_DIR

    processor = AutoProcessor.from_pretrained(tiny_model_dir if model_dir == "tiny" else BUNDLED_MODEL_DIR)
    question = [{"role": "user", "content": [{"type": "text", "text": "What is two plus two?"}]}]
    with pytest.raises(jinja2.TemplateError, match="answers questions about an image.*allow_text_only=true"):
        processor.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    allowed = processor.apply_chat_template(question, add_generation_prompt=True, tokenize=False, allow_text_only=True)
    assert allowed == VICUNA_V1.render(question, add_generation_prompt=True)
    # A whole conversation (as training renders one) and a placeholder written in the text are not refused.
    whole = [*question, {"role": "assistant", "content": "Four."}]
    assert processor.apply_chat_template(whole, tokenize=False) == VICUNA_V1.render(whole)
    typed = [{"role": "user", "content": "<image>\nWhat is it?"}]
    assert processor.apply_chat_template(typed, add_generation_prompt=True, tokenize=False).endswith(
        "USER: <image>\nWhat is it? ASSISTANT:"
    )


def test_each_image_placeholder_expands_to_the_configured_token_count(tiny_model_dir, rgb_image):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model_config = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).config
    prompts = ["<image>\nWhat is it?", "<image>\n<image>\nCompare them."]
    inputs = processor(text=prompts, images=[rgb_image, rgb_image, rgb_image], padding=True, return_tensors="pt")
    image_token_counts = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert image_token_counts == [model_config.num_image_tokens, 2 * model_config.num_image_tokens]
    assert processor.image_token_id == model_config.image_token_id
    assert inputs["pixel_values"].shape == (3, 3, 128, 128)


def test_placeholder_and_image_counts_must_agree(tiny_model_dir, rgb_image):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="Found 1 <image> tokens in the text but no images"):
        processor(text=["<image>\nWhat?"], return_tensors="pt")
    with pytest.raises(ValueError, match="should be the same as the number of images"):
        processor(text=["What?"], images=[rgb_image], return_tensors="pt")


def test_grayscale_rgba_and_palette_images_are_converted(tiny_model_dir, rgb_image):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    reference = processor.image_processor(images=[rgb_image], return_tensors="pt")["pixel_values"]
    for mode in ("L", "RGBA", "P"):
        converted = rgb_image.convert(mode)
        pixel_values = processor.image_processor(images=[converted], return_tensors="pt")["pixel_values"]
        assert pixel_values.shape == reference.shape
        expected = processor.image_processor(images=[converted.convert("RGB")], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixel_values, expected)


def test_save_load_round_trip_with_processor_and_pipeline(tiny_model_dir, rgb_image):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert isinstance(model, PIIPLlavaForConditionalGeneration)
    assert isinstance(processor, PIIPLlavaProcessor)
    prompt = processor.apply_chat_template(IMAGE_MESSAGES[:1], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[rgb_image], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected_text = processor.decode(expected[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    generator = pipeline("image-text-to-text", model=str(tiny_model_dir))
    chat = [{"role": "user", "content": [{"type": "image", "image": rgb_image}, IMAGE_MESSAGES[0]["content"][1]]}]
    result = generator(text=chat, max_new_tokens=5, do_sample=False, return_full_text=False)
    generator_images = generator(images=rgb_image, text=prompt, max_new_tokens=5, do_sample=False,
                                 return_full_text=False)
    assert result[0]["generated_text"] == expected_text
    assert generator_images[0]["generated_text"] == expected_text


def test_chat_session_streams_and_keeps_the_image_in_the_first_turn(tiny_model_dir, rgb_image):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    session = ChatSession(model, processor, rgb_image, {"max_new_tokens": 4, "do_sample": False})
    stream = io.StringIO()
    first = session.ask("What colour is the circle?", stream=stream)
    second = session.ask("And the square?", stream=stream)
    assert stream.getvalue().split() == f"{first}\n{second}\n".split()
    prompt = processor.apply_chat_template(session.messages, tokenize=False)
    assert prompt.count("<image>") == 1 and len(session.messages) == 4


# ----- mixed batches, construction without a token count, serving-engine sizing -------------------
def test_batch_mixing_text_only_and_image_prompts(tiny_model_dir, rgb_image):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    prompts = ["What is two plus two?", "<image>\nWhat colour is the circle?"]
    mixed = processor(text=prompts, images=[[], [rgb_image]], padding=True, return_tensors="pt")
    alone = processor(text=prompts[1:], images=[rgb_image], return_tensors="pt")
    image_tokens = (mixed["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert image_tokens == [0, processor.num_image_tokens]
    torch.testing.assert_close(mixed["pixel_values"], alone["pixel_values"], atol=0, rtol=0)
    text_only = processor(text=prompts[:1], images=[[]], return_tensors="pt")
    assert "pixel_values" not in text_only and not (text_only["input_ids"] == processor.image_token_id).any()


def test_chat_template_batch_mixing_text_only_and_image_conversations(tiny_model_dir, rgb_image):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    text_only = [{"role": "user", "content": "And the square?"}, {"role": "assistant", "content": "Blue."}]
    with_image = [
        {"role": "user", "content": [{"type": "image", "image": rgb_image}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "Red."},
    ]
    batch = processor.apply_chat_template(
        [text_only, with_image], tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        padding=True, return_tensors="pt",
    )
    image_tokens = (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert image_tokens == [0, processor.num_image_tokens]
    assert batch["pixel_values"].shape == (1, 3, 128, 128)
    for row, answer in zip(range(2), ("Blue.", "Red.")):
        masked = batch["input_ids"][row][batch["assistant_masks"][row].bool()]
        assert answer in processor.tokenizer.decode(masked)


def test_processor_builds_without_num_image_tokens_and_says_what_is_missing(tiny_model_dir, rgb_image):
    loaded = AutoProcessor.from_pretrained(tiny_model_dir)
    processor = PIIPLlavaProcessor(loaded.image_processor, loaded.tokenizer)
    assert processor(text=["No image here."], return_tensors="pt")["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match="has no num_image_tokens.*from_model_config"):
        processor(text=["<image>\nWhat?"], images=[rgb_image], return_tensors="pt")


def test_num_multimodal_tokens_agree_with_the_real_expansion(tiny_model_dir, rgb_image):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    sizes = [(60, 80), (300, 20)]
    data = processor._get_num_multimodal_tokens(image_sizes=sizes)
    images = [rgb_image, rgb_image.resize((20, 300))]
    inputs = processor(text=["<image>\nA", "<image>\nB"], images=images, padding=True, return_tensors="pt")
    expanded = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert data.num_image_tokens == expanded
    assert data.num_image_patches == [1, 1]
