"""Convert a released PIIP-LLaVA checkpoint directory into a transformers directory of ours.

`convert_released_checkpoint(src, dst)` reads the LLaVA `config.json`, the Python vision config
it names (as data), the weights and the tokenizer, and writes a directory that
`PIIPLlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load:
`config.json`, `generation_config.json`, safetensors shards, the tokenizer with `<image>`, the
processor (vicuna_v1 chat template, pad-to-square, ImageNet normalisation) and
`conversion_report.json` (what was renamed, dropped, filled, and where each branch's
architecture came from).

The `<image>` token: the released vocabulary (32000) has none, so it is appended (id 32000) and
the embedding table and LM head grow by exactly one row, set to the mean of the existing rows.
Logits over the original vocabulary are unchanged, and `generation_config.suppress_tokens`
keeps the new token from ever being generated.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.utils import logging

from piip_llava.dtypes import DTYPES, torch_dtype
from piip_llava.models.piip_llava import PIIPLlavaConfig, PIIPLlavaForConditionalGeneration

from .checkpoint_io import ShardWriter, find_weight_files, iter_tensors, parse_size, read_shapes
from .key_mapping import EXPECTED_UNUSED, PARAMETER_FREE_NORM_FILL, map_released_key
from .python_config import read_python_config
from .released_config import new_notes, piip_llava_config_from_released
from .tokenizer import add_image_token, load_released_tokenizer

logger = logging.get_logger(__name__)

GROWN_MATRICES = ("model.language_model.embed_tokens.weight", "lm_head.weight")
TOKENIZER_PROBES = (
    "Hello world",
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: What is in the image? ASSISTANT:",
    "line one\nline two",
    "  double  spaces and ünïcode 漢字",
)


class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked; the message says what to change."""


@dataclass
class ConversionReport:
    source: str
    destination: str
    vision_config_file: str
    architecture_sources: dict = field(default_factory=dict)
    branch_overrides: dict = field(default_factory=dict)
    ignored_config_keys: list = field(default_factory=list)
    renamed: int = 0
    dropped_expected_unused: list = field(default_factory=list)
    unused: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    filled: list = field(default_factory=list)
    image_token_index: int | None = None
    original_vocab_size: int | None = None
    vocab_size: int | None = None
    tokenizer_mismatches: list = field(default_factory=list)
    dtype: str | None = None
    files: list = field(default_factory=list)

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, "conversion_report.json"), "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle, indent=2)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def check_destination(src: str, dst: str, overwrite: bool) -> None:
    """Refuse a destination that would destroy or mix with data: the source itself, a folder inside it or
    around it, a file, or (without `overwrite`) a directory that already holds something."""
    source, destination = Path(src).resolve(), Path(dst).resolve()
    if destination == source or source in destination.parents:
        raise ConversionError(
            f"the destination {dst} is the source checkpoint {src} or inside it; converting there would overwrite "
            "the checkpoint being read. Choose a directory outside the source."
        )
    if destination in source.parents:
        raise ConversionError(
            f"the destination {dst} contains the source checkpoint {src}; replacing it would delete the source. "
            "Choose a directory outside the source."
        )
    if destination.exists() and not destination.is_dir():
        raise ConversionError(f"the destination {dst} exists and is not a directory.")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise ConversionError(
            f"the destination {dst} is not empty; pass overwrite=True (--overwrite) to replace its contents, or "
            "choose a new or empty directory."
        )


def staging_directory(dst: str) -> Path:
    """A new directory beside `dst` to write the conversion into (created with the usual permissions)."""
    destination = Path(dst).resolve()
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.converting-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def move_into_place(staging: Path, dst: str) -> None:
    """Replace `dst` (absent, empty, or being overwritten) by the finished `staging` directory."""
    destination = Path(dst).resolve()
    if not destination.exists():
        os.replace(staging, destination)
        return
    replaced = destination.parent / f".{destination.name}.replaced-{uuid.uuid4().hex[:8]}"
    os.replace(destination, replaced)
    os.replace(staging, destination)
    shutil.rmtree(replaced)


def resolve_vision_config_file(checkpoint_dir: str, llava_config: dict, override: str | None = None) -> str:
    """The Python config file `mm_vision_tower` names, relative to the checkpoint dir or absolute."""
    name = override or llava_config.get("mm_vision_tower") or llava_config.get("vision_tower")
    if not name or not str(name).endswith(".py"):
        raise ConversionError(
            f"{checkpoint_dir}/config.json names mm_vision_tower={name!r}, not a PIIP Python config file; pass "
            f"vision_config_file=... (--vision-config) to point at it."
        )
    path = name if os.path.isabs(name) else os.path.join(checkpoint_dir, name)
    if os.path.isfile(path):
        return path
    raise ConversionError(
        f"The vision config {name!r} named by config.json is not in {checkpoint_dir}; copy it there (it is published "
        f"with the official code under llava/configs/) or pass vision_config_file=... (--vision-config)."
    )


def expected_parameters(config: PIIPLlavaConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of our model's saved tensors, from a model built on the meta device."""
    with init_empty_weights():  # parameters on the meta device; schedules and buffers computed on the CPU
        model = PIIPLlavaForConditionalGeneration(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _grow_rows(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """Append `rows` rows equal to the mean of the existing ones (computed in fp32)."""
    if rows <= 0:
        return matrix
    mean_row = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean_row.expand(rows, -1)], dim=0)


def _check_tokenizer(tokenizer, checkpoint_dir: str) -> list[str]:
    """Probe strings the rebuilt tokenizer splits differently from SentencePiece itself."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(checkpoint_dir, "tokenizer.model"))
    mismatches = []
    for text in TOKENIZER_PROBES:
        if tokenizer.encode(text, add_special_tokens=False) != processor.encode(text):
            mismatches.append(text)
    if mismatches:
        logger.warning(
            f"The rebuilt tokenizer splits {mismatches} differently from SentencePiece (the tokenizer.model applies a "
            f"normaliser that LLaMA's does not); check the tokenizer before using the converted model."
        )
    return mismatches


def convert_released_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    vision_config_file: str | None = None,
    branch_overrides: dict[int, dict] | None = None,
    allow_unused: bool = False,
    allow_missing: bool = False,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    pad_to_square: bool = True,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert the released checkpoint in `src` into our format in `dst`; returns the report (also saved).

    Args:
        vision_config_file: the Python vision config, when not where config.json says.
        branch_overrides: `{branch_number (1-based): {backbone config key: value}}`, e.g.
            `{2: {"num_attention_heads": 12}}` for what the weights' shapes cannot reveal.
        allow_unused / allow_missing: write the model even if some checkpoint tensors map to nothing of
            ours / some of our parameters get no tensor (they are then initialised at load time).
        dtype: "float32", "float16" or "bfloat16" to cast floating tensors; default keeps the checkpoint's.
        max_shard_size: largest output shard, bytes or a string like "5GB".
        pad_to_square: the processor pads images to a square with the mean colour (LLaVA's
            `image_aspect_ratio="pad"`, how the released models were evaluated).
        overwrite: replace the contents of a non-empty `dst` (otherwise refused).

    The output is written into a new directory beside `dst` and moved into place when complete, so a
    failed conversion leaves `dst` as it was. `dst` may be neither `src` nor inside or around it.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    check_destination(src, dst, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    config_path = os.path.join(src, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{src} has no config.json; is it a released PIIP-LLaVA checkpoint directory?")
    llava_config = _read_json(config_path)
    vision_file = resolve_vision_config_file(src, llava_config, vision_config_file)
    released_model = read_python_config(vision_file)
    weight_files = find_weight_files(src)
    shapes = read_shapes(weight_files)

    tokenizer = load_released_tokenizer(src)
    tokenizer_mismatches = _check_tokenizer(tokenizer, src)
    image_token_index = add_image_token(tokenizer)

    notes = new_notes()
    try:
        config = piip_llava_config_from_released(
            llava_config,
            released_model,
            checkpoint_dir=src,
            shapes=shapes,
            branch_overrides=branch_overrides,
            image_token_index=image_token_index,
            notes=notes,
        )
    except ValueError as error:
        raise ConversionError(str(error)) from error
    report = ConversionReport(source=src, destination=dst, vision_config_file=vision_file, **notes)
    report.image_token_index = image_token_index
    report.original_vocab_size = llava_config["vocab_size"]
    report.vocab_size = config.text_config.vocab_size
    report.tokenizer_mismatches = tokenizer_mismatches

    mapping, unused = {}, []
    for name in shapes:
        ours = map_released_key(name, config.projector_norm)
        if ours is None:
            unused.append(name)
        elif ours == EXPECTED_UNUSED:
            report.dropped_expected_unused.append(name)
        else:
            mapping[name] = ours
    expected = expected_parameters(config)
    filled = {}
    if config.projector_norm == "layer_norm":
        for branch in range(config.vision_config.num_branches):
            for suffix, value in PARAMETER_FREE_NORM_FILL.items():
                filled[f"model.multi_modal_projector.branches.{branch}.{suffix}"] = value
    produced = set(mapping.values()) | set(filled)
    unused += sorted(ours for ours in produced if ours not in expected)  # a rule produced a name we do not have
    missing = sorted(set(expected) - produced)
    report.unused, report.missing, report.filled = sorted(unused), missing, sorted(filled)
    _check_shapes(mapping, shapes, expected, config)
    if unused and not allow_unused:
        raise ConversionError(
            f"{len(unused)} checkpoint tensors map to nothing in our model (first: {sorted(unused)[:5]}); this usually "
            f"means a different architecture. Pass allow_unused=True (--allow-unused) to drop them anyway."
        )
    if missing and not allow_missing:
        raise ConversionError(
            f"{len(missing)} parameters of our model get no tensor from the checkpoint (first: {missing[:5]}). Pass "
            f"allow_missing=True (--allow-missing) to leave them at their initial values."
        )

    staging = staging_directory(dst)
    try:
        report.dtype = _write_weights(
            staging, weight_files, mapping, filled, expected, config, dtype, parse_size(max_shard_size), len(shapes)
        )
        report.renamed = len(mapping)
        config.dtype = report.dtype
        config.architectures = ["PIIPLlavaForConditionalGeneration"]
        config.save_pretrained(staging)
        _generation_config(src, config, image_token_index).save_pretrained(staging)
        _processor(config, tokenizer, pad_to_square).save_pretrained(staging)
        report.files = sorted(os.listdir(staging)) + ["conversion_report.json"]
        report.save(staging)
        move_into_place(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        f"Converted {src} -> {dst}: {report.renamed} tensors, {len(report.dropped_expected_unused)} expected-unused "
        f"dropped, <image> = {image_token_index}."
    )
    return report


def _check_shapes(mapping: dict, shapes: dict, expected: dict, config: PIIPLlavaConfig) -> None:
    problems = []
    for official, ours in mapping.items():
        if ours not in expected:
            continue
        want, have = expected[ours], shapes[official]
        if ours in GROWN_MATRICES:
            want = (min(want[0], have[0]),) + want[1:]
            have = (min(want[0], have[0]),) + have[1:]
        if ours.endswith("layer_scale_parameter"):
            have = (have[-1],)
        if tuple(want) != tuple(have):
            problems.append(f"{official} {tuple(shapes[official])} -> {ours} {tuple(expected[ours])}")
    if problems:
        raise ConversionError(
            f"{len(problems)} tensors do not have the shapes our config expects (first: {problems[:3]}); the "
            f"architecture read from the configs is wrong. Check the branch overrides or the local pretrained configs."
        )


def _write_weights(dst, weight_files, mapping, filled, expected, config, dtype, max_shard_bytes, tensor_count) -> str:
    """Stream the renamed tensors into shards; returns the dtype name the model is stored in."""
    writer = ShardWriter(os.fspath(dst), max_shard_bytes)
    vocab_size = config.text_config.vocab_size
    cast = torch_dtype(dtype) if dtype else None
    seen_dtypes = {}
    tensors = tqdm(iter_tensors(weight_files), total=tensor_count, desc="Converting", unit="tensor")
    for official, tensor in tensors:
        ours = mapping.get(official)
        if ours is None or ours not in expected:
            continue
        if ours in GROWN_MATRICES:
            tensor = _grow_rows(tensor, vocab_size - tensor.shape[0])
        if ours.endswith("layer_scale_parameter"):
            tensor = tensor.reshape(-1)
        if cast is not None and tensor.is_floating_point():
            tensor = tensor.to(cast)
        seen_dtypes[tensor.dtype] = seen_dtypes.get(tensor.dtype, 0) + tensor.numel()
        writer.add(ours, tensor)
    storage = cast or max(seen_dtypes, key=seen_dtypes.get)
    for ours, value in filled.items():
        writer.add(ours, torch.full(expected[ours], value, dtype=storage))
    writer.close()
    return str(storage).replace("torch.", "")


def _generation_config(src: str, config: PIIPLlavaConfig, image_token_index: int) -> GenerationConfig:
    """The released generation settings (if any) plus `<image>` suppressed, so it is never generated."""
    path = os.path.join(src, "generation_config.json")
    settings = _read_json(path) if os.path.isfile(path) else {}
    settings = {key: value for key, value in settings.items() if key != "transformers_version"}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config.text_config, key, None)
        if settings.get(key) is None and value is not None:
            settings[key] = value
    suppressed = set(settings.get("suppress_tokens") or []) | {image_token_index}
    settings["suppress_tokens"] = sorted(suppressed)
    return GenerationConfig(**settings)


def _processor(config: PIIPLlavaConfig, tokenizer, pad_to_square: bool):
    from piip_llava.models.piip.image_processing_piip import PIIPImageProcessor
    from piip_llava.models.piip_llava.processing_piip_llava import PIIPLlavaProcessor

    image_processor = PIIPImageProcessor(size=config.vision_config.image_size, pad_to_square=pad_to_square)
    return PIIPLlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        conversation_format="vicuna_v1",
    )


__all__ = ["ConversionError", "ConversionReport", "check_destination", "convert_released_checkpoint", "expected_parameters"]
