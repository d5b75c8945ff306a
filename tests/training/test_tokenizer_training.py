import time

import pytest
from transformers import AutoTokenizer, LlamaTokenizer

from piip_llava.conversation import IMAGE_PLACEHOLDER, VICUNA_SYSTEM
from piip_llava.tokenizer_training import BYTE_TOKENS, train_llama_style_tokenizer

CORPUS = [
    VICUNA_SYSTEM,
    "USER: What is in the image? ASSISTANT: A cat sitting on a red mat.",
    "The quick brown fox jumps over the lazy dog.\nA second line follows.",
    "a photo of a dog playing in the snow",
] * 10

UNICODE_TEXTS = [
    "Héllo wörld, ça va? Ünïcödé façade.",
    "你好，世界！ こんにちは 안녕하세요",
    "emoji 🐱🚀 and combining e\u0301 plus zero\u200bwidth",
    "tabs\tand\nnewlines\n\nand  double  spaces",
    "never seen characters: ∮ ∀x∈ℝ ⌘ ᚠᛇᚻ",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_llama_style_tokenizer(CORPUS, vocab_size=512)


def test_training_is_fast_enough_for_a_test_session():
    start = time.perf_counter()
    train_llama_style_tokenizer(CORPUS, vocab_size=512)
    assert time.perf_counter() - start < 2.0


def test_result_is_transformers_llama_tokenizer(tokenizer):
    assert isinstance(tokenizer, LlamaTokenizer)
    assert tokenizer.is_fast


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_arbitrary_unicode_round_trips_without_unknown_tokens(tokenizer, text):
    # Texts start with a non-space: like LLaMA, the decoder drops the one "▁" it prepends.
    ids = tokenizer.encode(text)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_unseen_characters_fall_back_to_bytes(tokenizer):
    tokens = tokenizer.tokenize("∮")
    # "▁" then the three UTF-8 bytes of U+222E.
    assert tokens[-3:] == ["<0xE2>", "<0x88>", "<0xAE>"]


def test_numbers_are_spelt_digit_by_digit_even_when_frequent():
    tokenizer = train_llama_style_tokenizer(["The number 487 is written here, 487 again and 12."] * 50, vocab_size=400)
    assert tokenizer.tokenize("487 and 12") == ["▁", "4", "8", "7", "▁and", "▁", "1", "2"]
    assert tokenizer.decode(tokenizer.encode("487 and 12"), skip_special_tokens=True) == "487 and 12"


def test_special_token_ids_follow_llama(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens(list(range(3, 3 + 256))) == BYTE_TOKENS
    pad_id = tokenizer.pad_token_id
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    assert tokenizer.pad_token == "<pad>"
    assert {pad_id, image_id} == {len(tokenizer) - 2, len(tokenizer) - 1}
    assert len(tokenizer) <= 512 + 2


def test_bos_is_added_and_eos_is_not(tokenizer):
    ids = tokenizer("a photo of a dog").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] != tokenizer.eos_token_id
    assert tokenizer("a photo of a dog", add_special_tokens=False).input_ids == ids[1:]


def test_image_placeholder_is_one_token(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    assert tokenizer.encode(IMAGE_PLACEHOLDER, add_special_tokens=False) == [image_id]
    ids = tokenizer.encode("USER: <image>\nWhat is it?", add_special_tokens=False)
    assert ids.count(image_id) == 1
    assert tokenizer.convert_ids_to_tokens(ids[ids.index(image_id) + 1]) == "\n"


def test_end_of_turn_text_maps_to_eos(tokenizer):
    ids = tokenizer.encode("A cat.</s>USER:", add_special_tokens=False)
    assert ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.convert_ids_to_tokens(ids).index("</s>") == ids.index(tokenizer.eos_token_id)


def test_save_and_auto_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is type(tokenizer)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.all_special_ids == tokenizer.all_special_ids
    assert loaded.model_max_length == tokenizer.model_max_length
    for text in [*UNICODE_TEXTS, "</s>USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"]:
        original = tokenizer(text, return_offsets_mapping=True)
        reloaded = loaded(text, return_offsets_mapping=True)
        assert reloaded.input_ids == original.input_ids
        assert reloaded.offset_mapping == original.offset_mapping
        assert loaded.decode(reloaded.input_ids) == tokenizer.decode(original.input_ids)


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_llama_style_tokenizer(CORPUS, vocab_size=100)
