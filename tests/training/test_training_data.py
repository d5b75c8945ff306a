import json
import logging

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from piip_llava.conversation import VICUNA_SYSTEM, VICUNA_V1
from piip_llava.tokenizer_training import train_llama_style_tokenizer
from piip_llava.training import (
    IGNORE_INDEX,
    LlavaDataCollator,
    LlavaSupervisedDataset,
    ModalityLengthGroupedSampler,
)

NUM_IMAGE_TOKENS = 5
IMAGE_SIZE = 8
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CORPUS = [
    VICUNA_SYSTEM,
    "USER: What is in the image? ASSISTANT: A cat sitting on a red mat.",
    "USER: And what colour is it? ASSISTANT: It is grey with white paws.",
    "a photo of a dog playing in the snow\nA second line.",
] * 10


class StandInImageProcessor:
    """The `PIIPImageProcessor` call signature: optional pad to square, resize to S x S, normalise."""

    def __init__(self, size: int = IMAGE_SIZE):
        self.size = size
        self.calls = []

    def __call__(self, images, return_tensors="pt", pad_to_square=False):
        pixel_values = []
        for image in images:
            self.calls.append({"mode": image.mode, "pad_to_square": pad_to_square})
            if pad_to_square:
                side = max(image.size)
                canvas = Image.new("RGB", (side, side), tuple(int(mean * 255) for mean in IMAGENET_MEAN))
                canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
                image = canvas
            array = np.asarray(image.resize((self.size, self.size), Image.BICUBIC), dtype=np.float32) / 255.0
            pixels = torch.from_numpy(array).permute(2, 0, 1)  # (3, S, S)
            mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
            pixel_values.append((pixels - mean) / std)
        return {"pixel_values": torch.stack(pixel_values)}


@pytest.fixture(scope="module")
def tokenizer():
    return train_llama_style_tokenizer(CORPUS, vocab_size=512)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    gradient = np.linspace(0, 255, 12 * 6 * 3).reshape(6, 12, 3).astype(np.uint8)
    Image.fromarray(gradient, "RGB").save(folder / "wide.png")
    Image.fromarray(gradient[..., 0], "L").save(folder / "gray.png")
    Image.fromarray(np.dstack([gradient, np.full((6, 12), 128, np.uint8)]), "RGBA").save(folder / "alpha.png")
    Image.fromarray(gradient, "RGB").quantize(8).save(folder / "palette.png")
    (folder / "corrupt.png").write_bytes(b"this is not an image")
    whole = (folder / "wide.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return folder


def make_dataset(tokenizer, records, image_folder=None, **kwargs):
    kwargs.setdefault("num_image_tokens", NUM_IMAGE_TOKENS)
    return LlavaSupervisedDataset(records, tokenizer, StandInImageProcessor(), image_folder=image_folder, **kwargs)


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": value} for i, value in enumerate(values)]


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def encode_after(tokenizer, special, text):
    """`text` as it tokenizes right after a special token (no word-start "▁" is prepended there)."""
    ids = encode(tokenizer, special + text)
    assert ids[0] == tokenizer.convert_tokens_to_ids(special)
    return ids[1:]


def expand_image(ids, image_id, count=NUM_IMAGE_TOKENS):
    return [expanded for token in ids for expanded in ([token] * count if token == image_id else [token])]


def image_id(tokenizer):
    return tokenizer.convert_tokens_to_ids("<image>")


# ---------------------------------------------------------------------------------------------
# Label masking


def test_plain_format_supervises_only_the_caption_and_its_newline(tokenizer, image_folder):
    record = {"id": "p", "image": "wide.png", "conversations": turns("<image>\nDescribe it briefly.", "a dog in snow")}
    sample = make_dataset(tokenizer, [record], image_folder, conversation_format="plain")[0]

    caption = encode_after(tokenizer, "<image>", "a dog in snow\n")
    expected_ids = [tokenizer.bos_token_id] + [image_id(tokenizer)] * NUM_IMAGE_TOKENS + caption
    expected_labels = [IGNORE_INDEX] * (1 + NUM_IMAGE_TOKENS) + caption
    assert sample["input_ids"].tolist() == expected_ids
    assert sample["labels"].tolist() == expected_labels
    assert tokenizer.decode(caption) == "a dog in snow\n"
    assert sample["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)


def test_vicuna_single_turn_moves_image_first_and_supervises_reply_with_eos(tokenizer, image_folder):
    record = {"id": "v", "image": "wide.png", "conversations": turns("What is it?\n<image>", "A cat.")}
    sample = make_dataset(tokenizer, [record], image_folder)[0]

    prompt = expand_image(
        encode(tokenizer, f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"), image_id(tokenizer)
    )
    reply = encode(tokenizer, " A cat.")  # the space before a reply belongs to its first token
    eos = tokenizer.eos_token_id
    expected_ids = [tokenizer.bos_token_id, *prompt, *reply, eos]
    expected_labels = [IGNORE_INDEX] * (1 + len(prompt)) + reply + [eos]
    assert sample["input_ids"].tolist() == expected_ids
    assert sample["labels"].tolist() == expected_labels
    assert tokenizer.convert_ids_to_tokens(reply)[0] == "▁A"

    # The ids are exactly what the processor produces at inference from the rendered prompt.
    rendered = VICUNA_V1.render(
        [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."}]
    )
    assert sample["input_ids"].tolist() == expand_image(tokenizer(rendered).input_ids, image_id(tokenizer))


def test_vicuna_multi_turn_supervises_every_reply_and_nothing_else(tokenizer):
    record = {"id": "m", "conversations": turns("What is in the image?", "A cat.", "And what colour?", "Grey.")}
    sample = make_dataset(tokenizer, [record])[0]

    eos = tokenizer.eos_token_id
    first_prompt = encode(tokenizer, f"{VICUNA_SYSTEM} USER: What is in the image? ASSISTANT:")
    first_reply = encode(tokenizer, " A cat.")
    second_prompt = encode_after(tokenizer, "</s>", "USER: And what colour? ASSISTANT:")
    second_reply = encode(tokenizer, " Grey.")
    expected_ids = [tokenizer.bos_token_id, *first_prompt, *first_reply, eos, *second_prompt, *second_reply, eos]
    expected_labels = (
        [IGNORE_INDEX] * (1 + len(first_prompt))
        + first_reply
        + [eos]
        + [IGNORE_INDEX] * len(second_prompt)
        + second_reply
        + [eos]
    )
    assert sample["input_ids"].tolist() == expected_ids
    assert sample["labels"].tolist() == expected_labels
    assert "pixel_values" not in sample

    supervised = [token for token, label in zip(sample["input_ids"].tolist(), expected_labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "A cat.</s> Grey.</s>"
    assert tokenizer.convert_ids_to_tokens(second_prompt)[0] == "USER"  # no "▁" right after "</s>"
    # "▁Grey" is not in the small vocabulary: the reply starts with a lone "▁", which covers only
    # the space after "ASSISTANT:" and must still be learned.
    assert tokenizer.convert_ids_to_tokens(second_reply)[:2] == ["▁", "<0x47>"]


def test_non_ascii_reply_is_supervised_byte_for_byte(tokenizer):
    # Byte-fallback pieces of one character share its offsets; all of them must be labelled.
    record = {"id": "u", "conversations": turns("Où? 你好", "Ça va 🐱 très bien.")}
    sample = make_dataset(tokenizer, [record])[0]
    reply = encode(tokenizer, " Ça va 🐱 très bien.")
    labels = sample["labels"].tolist()
    assert labels[-len(reply) - 1 :] == reply + [tokenizer.eos_token_id]
    assert all(label == IGNORE_INDEX for label in labels[: -len(reply) - 1])


def test_expanded_image_token_can_differ_from_the_placeholder(tokenizer, image_folder):
    record = {"id": "x", "image": "wide.png", "conversations": turns("<image>", "a dog")}
    sample = make_dataset(tokenizer, [record], image_folder, conversation_format="plain", image_token_id=7)[0]
    assert sample["input_ids"].tolist()[1 : 1 + NUM_IMAGE_TOKENS] == [7] * NUM_IMAGE_TOKENS
    assert image_id(tokenizer) not in sample["input_ids"].tolist()


# ---------------------------------------------------------------------------------------------
# Truncation


def plain_record(caption="a dog in snow"):
    return {"id": "t", "image": "wide.png", "conversations": turns("<image>", caption)}


@pytest.mark.parametrize("kept_caption_tokens", [1, 2])
def test_truncation_cuts_the_tail_and_keeps_the_image(tokenizer, image_folder, kept_caption_tokens):
    full = make_dataset(tokenizer, [plain_record()], image_folder, conversation_format="plain")[0]
    max_length = 1 + NUM_IMAGE_TOKENS + kept_caption_tokens
    cut = make_dataset(tokenizer, [plain_record()], image_folder, conversation_format="plain", max_length=max_length)[0]
    assert len(full["input_ids"]) > max_length
    assert cut["input_ids"].tolist() == full["input_ids"].tolist()[:max_length]
    assert cut["labels"].tolist() == full["labels"].tolist()[:max_length]
    assert (cut["labels"] != IGNORE_INDEX).sum() == kept_caption_tokens


@pytest.mark.parametrize(
    "max_length",
    [
        1 + NUM_IMAGE_TOKENS - 1,  # would cut through the image tokens
        1 + NUM_IMAGE_TOKENS,  # keeps the image but no caption token
    ],
)
def test_samples_that_cannot_be_truncated_are_skipped_as_too_long(tokenizer, image_folder, max_length):
    text_only = {"id": "short", "conversations": turns("Hi?", "a")}  # [bos, "a", "\n"] fits
    dataset = make_dataset(
        tokenizer, [plain_record(), text_only], image_folder, conversation_format="plain", max_length=max_length
    )
    assert torch.equal(dataset[0]["input_ids"], dataset[1]["input_ids"])
    assert dataset.skipped_summary() == {"too_long": 1}


def test_too_long_sample_is_replaced_by_the_next_one(tokenizer, image_folder):
    long_question = " ".join(["question"] * 200)
    records = [
        {"id": "long", "conversations": turns(long_question, "A cat.")},
        {"id": "ok", "conversations": turns("Hi?", "A cat.")},
    ]
    dataset = make_dataset(tokenizer, records, max_length=64)
    assert torch.equal(dataset[0]["input_ids"], dataset[1]["input_ids"])
    assert dataset.skipped_summary() == {"too_long": 1}
    assert dataset.skipped[0][0] == "too_long"


# ---------------------------------------------------------------------------------------------
# Bad data

GOOD_TEXT = {"id": "good-text", "conversations": turns("Hi?", "A cat.")}
GOOD_IMAGE = {"id": "good-image", "image": "wide.png", "conversations": turns("<image>\nWhat?", "A cat.")}
BAD_RECORDS = {
    "missing_image": {"id": "b1", "image": "absent.png", "conversations": turns("<image>\nWhat?", "A cat.")},
    "corrupt_image": {"id": "b2", "image": "corrupt.png", "conversations": turns("<image>\nWhat?", "A cat.")},
    "truncated_image": {"id": "b3", "image": "truncated.png", "conversations": turns("<image>\nWhat?", "A cat.")},
    "gpt_first": {"id": "b4", "conversations": [{"from": "gpt", "value": "A cat."}, {"from": "human", "value": "?"}]},
    "unknown_speaker": {"id": "b5", "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}]},
    "unanswered": {"id": "b6", "conversations": turns("Hi?", "A cat.", "And?")},
    "empty_list": {"id": "b7", "conversations": []},
    "no_conversations": {"id": "b8"},
    "image_without_placeholder": {"id": "b9", "image": "wide.png", "conversations": turns("What?", "A cat.")},
    "placeholder_without_image": {"id": "b10", "conversations": turns("<image>\nWhat?", "A cat.")},
    "two_placeholders": {"id": "b11", "image": "wide.png", "conversations": turns("<image><image>", "A cat.")},
    "placeholder_in_reply": {"id": "b12", "image": "wide.png", "conversations": turns("<image>", "A <image>.")},
    "value_not_text": {"id": "b13", "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "y"}]},
    "too_long": {"id": "b14", "conversations": turns(" ".join(["word"] * 300), "A cat.")},
}
EXPECTED_REASONS = {
    "missing_image": 1,
    "corrupt_image": 2,
    "bad_roles": 3,
    "empty_conversation": 2,
    "image_placeholder_mismatch": 4,
    "malformed_record": 1,
    "too_long": 1,
}


def mixed_records():
    records = []
    for bad in BAD_RECORDS.values():
        records += [GOOD_TEXT, bad, GOOD_IMAGE]
    return records


def test_every_kind_of_bad_record_is_skipped_counted_and_warned(tokenizer, image_folder, caplog):
    dataset = make_dataset(tokenizer, mixed_records(), image_folder, max_length=128)
    with caplog.at_level(logging.WARNING):
        samples = [dataset[index] for index in range(len(dataset))]
    assert dataset.skipped_summary() == EXPECTED_REASONS
    assert sorted(dataset.skipped) == list(range(1, len(dataset), 3))
    good_text, good_image = dataset[0], dataset[2]
    for index, sample in enumerate(samples):
        # A bad record is replaced by the next record, which is always a good image record here.
        expected = good_text if index % 3 == 0 else good_image
        assert torch.equal(sample["input_ids"], expected["input_ids"])
        assert torch.equal(sample["labels"], expected["labels"])
    warnings = [record.getMessage() for record in caplog.records if "Skipping training sample" in record.getMessage()]
    assert len(warnings) == len(BAD_RECORDS)
    assert any("(id 'b1'): missing_image" in message for message in warnings)
    assert "Skipped 14 of 42 training records" in _summary_line(dataset, caplog)


def _summary_line(dataset, caplog):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        dataset.log_skipped_summary()
    return caplog.records[-1].getMessage()


def test_scan_finds_the_same_bad_records_up_front(tokenizer, image_folder):
    dataset = make_dataset(tokenizer, mixed_records(), image_folder, max_length=128)
    assert dataset.scan() == EXPECTED_REASONS
    text_only = make_dataset(tokenizer, mixed_records(), image_folder, max_length=128)
    without_images = dict(EXPECTED_REASONS)
    del without_images["missing_image"], without_images["corrupt_image"]
    assert text_only.scan(load_images=False) == without_images


def test_plain_format_rejects_multi_turn_records(tokenizer, image_folder):
    records = [{"id": "multi", "image": "wide.png", "conversations": turns("<image>", "a", "b", "c")}, GOOD_IMAGE]
    dataset = make_dataset(tokenizer, records, image_folder, conversation_format="plain")
    dataset[0]
    assert dataset.skipped_summary() == {"bad_roles": 1}


def test_all_records_bad_raises_a_clear_error(tokenizer):
    dataset = make_dataset(tokenizer, [BAD_RECORDS["empty_list"], BAD_RECORDS["gpt_first"]])
    with pytest.raises(ValueError, match="Every one of the 2 training records is unusable"):
        dataset[0]


# ---------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("name", ["gray.png", "alpha.png", "palette.png"])
def test_non_rgb_images_reach_the_processor_as_rgb(tokenizer, image_folder, name):
    record = {"id": "i", "image": name, "conversations": turns("<image>", "a dog")}
    dataset = make_dataset(tokenizer, [record], image_folder, conversation_format="plain")
    sample = dataset[0]
    assert dataset.image_processor.calls == [{"mode": "RGB", "pad_to_square": True}]
    expected = StandInImageProcessor()(images=[Image.open(image_folder / name).convert("RGB")], pad_to_square=True)
    torch.testing.assert_close(sample["pixel_values"], expected["pixel_values"][0])


def test_image_aspect_ratio_is_passed_to_the_processor(tokenizer, image_folder):
    record = {"id": "i", "image": "wide.png", "conversations": turns("<image>", "a dog")}
    padded = make_dataset(tokenizer, [record], image_folder, image_aspect_ratio="pad")
    cropped = make_dataset(tokenizer, [record], image_folder, image_aspect_ratio="crop")
    assert not torch.allclose(padded[0]["pixel_values"], cropped[0]["pixel_values"])
    assert padded.image_processor.calls[0]["pad_to_square"] is True
    assert cropped.image_processor.calls[0]["pad_to_square"] is False


def test_invalid_arguments_name_the_problem(tokenizer):
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        make_dataset(tokenizer, [GOOD_TEXT], image_aspect_ratio="stretch")
    with pytest.raises(ValueError, match="Unknown conversation format"):
        make_dataset(tokenizer, [GOOD_TEXT], conversation_format="chatml")
    with pytest.raises(ValueError, match="num_image_tokens"):
        make_dataset(tokenizer, [GOOD_TEXT], num_image_tokens=0)
    with pytest.raises(ValueError, match="does not exist"):
        make_dataset(tokenizer, "/nonexistent/records.json")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("records.json", "[]", "records.json holds no training records"),
        ("records.jsonl", "\n\n", "records.jsonl is empty"),
        ("records.json", "", "records.json is empty"),
        ("records.json", json.dumps([GOOD_TEXT, GOOD_TEXT])[:-20],
         "records.json is not valid JSON \\(Unterminated string starting at line 1, column \\d+\\) .*truncated"),
        ("records.jsonl", json.dumps(GOOD_TEXT) + "\n" + json.dumps(GOOD_TEXT)[:-5],
         "records.jsonl is not valid JSON \\(.* line 2, column \\d+\\) .*truncated"),
        ("records.json", json.dumps(GOOD_TEXT), "must hold a JSON list of records .* not a JSON dict"),
    ],
    ids=["empty-list", "blank-jsonl", "empty-file", "truncated-json", "truncated-jsonl", "not-a-list"],
)
def test_a_data_file_without_usable_records_is_refused_naming_the_file(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as raised:
        make_dataset(tokenizer, path)
    assert str(path) in str(raised.value)


def test_an_empty_list_or_dataset_is_refused(tokenizer):
    with pytest.raises(ValueError, match="holds no training records"):
        make_dataset(tokenizer, [])
    with pytest.raises(ValueError, match="holds no training records"):
        make_dataset(tokenizer, Dataset.from_dict({"conversations": []}))


# ---------------------------------------------------------------------------------------------
# Sources


SOURCE_RECORDS = [
    {"id": "a", "image": "wide.png", "conversations": turns("Describe.\n<image>", "A gradient.", "More?", "No.")},
    {"id": "b", "conversations": turns("What is a cat?", "An animal.")},
    {"id": "c", "image": "gray.png", "conversations": turns("<image>\nWhat?", "Grey.")},
]


def assert_same_samples(first, second):
    assert len(first) == len(second)
    for index in range(len(first)):
        left, right = first[index], second[index]
        assert left.keys() == right.keys()
        for key in left:
            torch.testing.assert_close(left[key], right[key], rtol=0, atol=0)
    assert first.lengths == second.lengths
    assert first.has_image == second.has_image


def test_json_jsonl_and_datasets_sources_give_identical_samples(tokenizer, image_folder, tmp_path):
    json_path, jsonl_path = tmp_path / "records.json", tmp_path / "records.jsonl"
    json_path.write_text(json.dumps(SOURCE_RECORDS))
    jsonl_path.write_text("\n".join(json.dumps(record) for record in SOURCE_RECORDS) + "\n")
    from_list = make_dataset(tokenizer, SOURCE_RECORDS, image_folder)
    assert_same_samples(from_list, make_dataset(tokenizer, str(json_path), image_folder))
    assert_same_samples(from_list, make_dataset(tokenizer, jsonl_path, image_folder))
    assert_same_samples(from_list, make_dataset(tokenizer, Dataset.from_list(SOURCE_RECORDS), image_folder))

    # An `Image` feature column yields decoded PIL images instead of paths.
    absolute = [
        {**record, "image": str(image_folder / record["image"])} if "image" in record else record
        for record in SOURCE_RECORDS
    ]
    with_images = Dataset.from_list(absolute).cast_column("image", ImageFeature())
    assert_same_samples(from_list, make_dataset(tokenizer, with_images, image_folder=None))


def test_lengths_are_word_counts_plus_image_tokens(tokenizer, image_folder):
    dataset = make_dataset(tokenizer, SOURCE_RECORDS, image_folder)
    # LLaVA's estimate splits on whitespace, so the placeholder counts as a word too.
    assert dataset.lengths == [2 + 2 + 1 + 1 + NUM_IMAGE_TOKENS, 4 + 2, 2 + 1 + NUM_IMAGE_TOKENS]
    assert dataset.has_image == [True, False, True]


# ---------------------------------------------------------------------------------------------
# Sampler


def sampler_inputs():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (60,), generator=generator).tolist()
    has_image = [index % 3 != 0 for index in range(60)]  # 40 image, 20 text-only samples
    return lengths, has_image


def test_sampler_puts_image_and_text_samples_in_separate_megabatches():
    lengths, has_image = sampler_inputs()
    batch_size, world_size = 4, 2
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=batch_size, world_size=world_size, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(60))
    megabatch = batch_size * world_size
    full_megabatches = 40 // megabatch + 20 // megabatch
    for start in range(0, full_megabatches * megabatch, megabatch):
        assert len({has_image[index] for index in order[start : start + megabatch]}) == 1
    # Each per-device batch of a full megabatch is longest first.
    for start in range(0, full_megabatches * megabatch, batch_size):
        batch_lengths = [lengths[index] for index in order[start : start + batch_size]]
        assert batch_lengths == sorted(batch_lengths, reverse=True)
    # The leftovers (none of the 40 image samples, 4 of the 20 text-only ones) come last.
    assert [has_image[index] for index in order[full_megabatches * megabatch :]] == [False] * 4


def test_sampler_is_deterministic_per_seed_and_epoch():
    lengths, has_image = sampler_inputs()

    def order(seed, epoch=0):
        sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, world_size=2, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(seed=1) == order(seed=1)
    assert order(seed=1) != order(seed=2)
    assert order(seed=1, epoch=1) != order(seed=1, epoch=0)
    assert order(seed=1, epoch=1) == order(seed=1, epoch=1)


def test_sampler_without_modality_groups_by_length_only():
    lengths, _ = sampler_inputs()
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=5, world_size=1, group_by_modality=False)
    order = list(sampler)
    assert sorted(order) == list(range(60))
    for start in range(0, 60, 5):
        batch_lengths = [lengths[index] for index in order[start : start + 5]]
        assert batch_lengths == sorted(batch_lengths, reverse=True)
    with pytest.raises(ValueError, match="has_image"):
        ModalityLengthGroupedSampler(lengths, batch_size=5)


def test_sampler_balances_tokens_across_ranks():
    lengths = [100, 90, 80, 70, 60, 50, 40, 30]
    sampler = ModalityLengthGroupedSampler(lengths, [True] * 8, batch_size=4, world_size=2)
    order = list(sampler)
    rank_totals = [sum(lengths[index] for index in order[:4]), sum(lengths[index] for index in order[4:])]
    assert rank_totals == [260, 260]


# ---------------------------------------------------------------------------------------------
# Collator


def test_collator_pads_on_the_right_and_stacks_only_the_images():
    image = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE)
    features = [
        {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, -100, 6])},
        {
            "input_ids": torch.tensor([1, 9, 9, 7, 8]),
            "labels": torch.tensor([-100, -100, -100, 7, 8]),
            "pixel_values": image,
        },
    ]
    batch = LlavaDataCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 9, 9, 7, 8]]
    assert batch["labels"].tolist() == [[-100, -100, 6, -100, -100], [-100, -100, -100, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(batch["pixel_values"][0], image)

    text_only = LlavaDataCollator(pad_token_id=3, pad_to_multiple_of=8)(features[:1])
    assert "pixel_values" not in text_only
    assert text_only["input_ids"].tolist() == [[1, 5, 6, 3, 3, 3, 3, 3]]
    assert text_only["labels"].tolist() == [[-100, -100, 6] + [-100] * 5]


def test_collator_on_dataset_samples_keeps_image_order(tokenizer, image_folder):
    dataset = make_dataset(tokenizer, SOURCE_RECORDS, image_folder)
    batch = LlavaDataCollator(pad_token_id=tokenizer.pad_token_id)([dataset[0], dataset[1], dataset[2]])
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(batch["pixel_values"][0], dataset[0]["pixel_values"])
    assert torch.equal(batch["pixel_values"][1], dataset[2]["pixel_values"])
    image_rows = (batch["input_ids"] == image_id(tokenizer)).sum(dim=1).tolist()
    assert image_rows == [NUM_IMAGE_TOKENS, 0, NUM_IMAGE_TOKENS]
    with pytest.raises(ValueError, match="pad token"):
        LlavaDataCollator(pad_token_id=None)
