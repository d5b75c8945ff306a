"""Loading a model directory for inference: the one helper `chat` and `eval` share.

It checks what transformers would otherwise report as a traceback, or not at all:

- a MODEL path that is not a directory holding `config.json` (transformers takes any other string
  for a hub repository id and fails with "Repo id must use alphanumeric chars");
- a device that this machine does not have (`cuda:0` without CUDA, a GPU index past the last one);
- a weight file that cannot be read (truncated or corrupt safetensors);
- a folder without processor files, or with unreadable JSON;
- weights that do not match the config (e.g. a layer count edited in `config.json`): transformers
  loads such a model with the missing parameters at random values, and it answers anyway.

Every problem raises `ModelLoadingError` (a `ValueError`) with a message naming the directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers.utils import logging

from .dtypes import DTYPES, torch_dtype

logger = logging.get_logger(__name__)

SHOWN_NAMES = 5


class ModelLoadingError(ValueError):
    """A model directory, device or weight file that cannot be used; the message says which and why."""


def default_device() -> str:
    """The GPU of this process (LOCAL_RANK under torchrun/accelerate), else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """`model_dir` as a Path, if it is a directory with a `config.json`."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadingError(f"no such model directory: {path} (pass a local folder holding config.json).")
    if not (path / "config.json").is_file():
        raise ModelLoadingError(f"{path} is not a model directory: it has no config.json.")
    return path


def check_device(device: str) -> torch.device:
    """`device` as a torch.device, if this machine has it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ModelLoadingError(f"{device!r} is not a torch device (examples: cpu, cuda, cuda:0): {error}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadingError(
                f"device {device} asked for, but CUDA is not available here (torch {torch.__version__}, "
                f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelLoadingError(
                f"device {device} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible."
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadingError(f"device {device} asked for, but MPS is not available here; use --device cpu.")
    return parsed


def check_loading_info(model_dir: Path, info: dict) -> None:
    """Refuse a model whose saved weights and config disagree: it would answer with random parameters."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(entry[0]) if isinstance(entry, tuple) else str(entry)
                        for entry in info.get("mismatched_keys") or [])
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameter(s) have no saved weight (first: {missing[:SHOWN_NAMES]})")
    if unexpected:
        problems.append(f"{len(unexpected)} saved weight(s) belong to no parameter (first: {unexpected[:SHOWN_NAMES]})")
    if mismatched:
        problems.append(f"{len(mismatched)} weight(s) have the wrong shape (first: {mismatched[:SHOWN_NAMES]})")
    if problems:
        raise ModelLoadingError(
            f"the weights in {model_dir} do not match its config.json: {'; '.join(problems)}. The model would run "
            "with random parameters; check that config.json (e.g. its layer counts) belongs to these weights."
        )


def load_model_and_processor(model_dir: str | os.PathLike, device: str | None = None, dtype: str = "auto"):
    """Load an image-text-to-text checkpoint and its processor, ready for batched greedy decoding.

    `dtype` is "auto" (the saved dtype) or one of `DTYPES`; `device` defaults to `default_device()`.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import piip_llava  # noqa: F401  (registers the PIIP-LLaVA classes with the Auto* factories)

    if dtype != "auto" and dtype not in DTYPES:
        raise ModelLoadingError(f"Unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}.")
    path = check_model_dir(model_dir)
    target = check_device(device or default_device())
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:  # no processor files, or unreadable JSON in the folder
        raise ModelLoadingError(f"cannot load the processor (tokenizer and image settings) from {path}: {error}") from error
    if getattr(processor, "tokenizer", None) is None:
        raise ModelLoadingError(f"The processor in {path} has no tokenizer; decoding answers needs one.")
    # Left padding keeps every prompt's last token at the end of the row, where generation continues.
    processor.tokenizer.padding_side = "left"
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(
            path, dtype="auto" if dtype == "auto" else torch_dtype(dtype), output_loading_info=True
        )
    except (SafetensorError, OSError) as error:
        raise ModelLoadingError(
            f"cannot read the weights in {path}: {error}. A weight file is truncated or corrupt; copy or convert it again."
        ) from error
    except RuntimeError as error:
        if "mismatch" not in str(error):
            raise
        raise ModelLoadingError(
            f"the weights in {path} do not match its config.json: some have other shapes than the config gives "
            "(transformers' report above lists them). Check that config.json (e.g. its sizes) belongs to these weights."
        ) from error
    check_loading_info(path, info)
    model.to(target)
    model.eval()
    return model, processor


__all__ = ["ModelLoadingError", "check_device", "check_model_dir", "default_device", "load_model_and_processor"]
