"""Train a small LLaMA-style BPE tokenizer from text.

The tests and the tiny debug configurations need a real tokenizer that behaves like the
LLaMA/Vicuna one the released checkpoints use (metaspace "▁" words, byte fallback, `<s>`/`</s>`
special tokens, a bos at the start of every encoding) without downloading one. Training a few
hundred merges on a handful of sentences takes milliseconds, so each test session trains its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer
from transformers.utils import logging

from .conversation import IMAGE_PLACEHOLDER

logger = logging.get_logger(__name__)

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"

# LLaMA's order: <unk>, <s>, </s>, then the 256 byte pieces <0x00>..<0xFF> (ids 3..258).
BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]
BASE_TOKENS = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, *BYTE_TOKENS]


def train_bpe_vocabulary(texts: Iterable[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a BPE vocabulary and merges on `texts`, words split at metaspace boundaries.

    Training splits words at each "▁" (as SentencePiece does), so no merge ever joins two words;
    that is what lets the inference tokenizer run BPE over the whole unsplit string (LLaMA's
    `split=False` metaspace) and still produce the same pieces. Digits are split apart too, so no
    merge involves a digit and every number is spelt digit by digit, as LLaMA's tokenizer does.
    """
    if vocab_size <= len(BASE_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for learned pieces: the special and byte tokens alone "
            f"take {len(BASE_TOKENS)} ids."
        )
    bpe = Tokenizer(models.BPE(unk_token=UNK_TOKEN, byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BASE_TOKENS, show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model["merges"]]
    return model["vocab"], merges


def train_llama_style_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, model_max_length: int = 2048
) -> LlamaTokenizer:
    """A LLaMA-style fast tokenizer trained on `texts`.

    `vocab_size` bounds the BPE vocabulary (special and byte tokens included; a small corpus may
    fill fewer ids). `<pad>` and `<image>` are added after it as special tokens, so they never
    split and "<image>" in a prompt is always one id, as the processor and the training data
    expect. The result is transformers' own `LlamaTokenizer`, so `save_pretrained` and
    `AutoTokenizer.from_pretrained` round-trip it without custom code.
    """
    vocab, merges = train_bpe_vocabulary(texts, vocab_size)
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN, "extra_special_tokens": [IMAGE_PLACEHOLDER]})
    logger.info(f"Trained a LLaMA-style tokenizer with {len(tokenizer)} tokens ({len(merges)} merges).")
    return tokenizer
