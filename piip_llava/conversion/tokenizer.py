"""The released LLaMA/Vicuna tokenizer, rebuilt as transformers' own LlamaTokenizer with `<image>` added.

Released checkpoints ship only the SentencePiece `tokenizer.model` (no `tokenizer.json`).
transformers 5 converts such a file through protobuf, which is not a dependency here, so the
vocabulary and merges are read with the `sentencepiece` library itself
(`SentencePieceExtractor`) and handed to `LlamaTokenizer` (BPE, byte fallback, metaspace
prefix), which then saves a `tokenizer.json` that loads anywhere without sentencepiece.
"""

from __future__ import annotations

import json
import os

from transformers import LlamaTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

from ..conversation import IMAGE_PLACEHOLDER

TOKENIZER_CONFIG_KEYS = ("add_bos_token", "add_eos_token", "model_max_length", "legacy")


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_released_tokenizer(checkpoint_dir: str) -> LlamaTokenizer:
    """The checkpoint's tokenizer, from `tokenizer.model` and its json settings (read as data)."""
    model_path = os.path.join(checkpoint_dir, "tokenizer.model")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{checkpoint_dir} has no tokenizer.model (the released LLaMA tokenizer).")
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(checkpoint_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                settings.update({key: value for key, value in json.load(handle).items() if value is not None})
    vocab, _, merges = SentencePieceExtractor(model_path).extract()
    options = {key: settings[key] for key in TOKENIZER_CONFIG_KEYS if key in settings}
    if options.get("model_max_length", 0) > 1e12:
        options.pop("model_max_length")  # the "unset" sentinel of old tokenizer configs
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=_token_content(settings.get("unk_token", "<unk>")),
        bos_token=_token_content(settings.get("bos_token", "<s>")),
        eos_token=_token_content(settings.get("eos_token", "</s>")),
        **{"legacy": False, "add_bos_token": True, "add_eos_token": False, **options},
    )


def add_image_token(tokenizer: LlamaTokenizer) -> int:
    """Add `<image>` as a special token (never split, never generated) and return its id.

    LLaVA pads with `<unk>`, so a tokenizer without a pad token gets `<unk>` as pad.
    """
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)


__all__ = ["add_image_token", "load_released_tokenizer"]
