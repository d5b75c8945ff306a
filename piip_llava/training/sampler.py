"""Batching by modality and length, as LLaVA-1.5 instruction tuning does (`group_by_modality_length`).

Image and text-only samples go in separate megabatches (one optimizer step's worth of samples
across all processes), so no step mixes a vision-heavy batch with a text one, and samples within
a megabatch are sorted by length, so padding stays small. The order is a pure function of the
seed and the epoch: every process builds the same list, and the data loader's usual sharding
(consecutive per-device batches go to consecutive ranks) hands each rank one chunk of each
megabatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Sampler


def split_to_even_chunks(megabatch: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """`megabatch` (longest first) cut into `num_chunks` equal chunks with similar total lengths.

    Greedy: each index goes to the chunk with the smallest total so far, so every rank gets about
    the same number of tokens. A megabatch that does not divide evenly is dealt round-robin.
    """
    if len(megabatch) % num_chunks != 0:
        return [megabatch[chunk::num_chunks] for chunk in range(num_chunks)]
    chunk_size = len(megabatch) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in megabatch:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == chunk_size:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """A random order of `range(len(lengths))` sorted by length within each megabatch."""
    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    megabatch_size = batch_size * world_size
    ordered = []
    for start in range(0, len(shuffled), megabatch_size):
        megabatch = sorted(shuffled[start : start + megabatch_size], key=lambda index: lengths[index], reverse=True)
        for chunk in split_to_even_chunks(megabatch, lengths, world_size):
            ordered.extend(chunk)
    return ordered


def modality_length_grouped_indices(
    lengths: Sequence[int], has_image: Sequence[bool], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """Length-grouped order where every full megabatch holds only image or only text-only samples.

    The two partial megabatches left over (one per modality) go last, image samples first, so at
    most the final steps mix modalities.
    """
    image_indices = [index for index, image in enumerate(has_image) if image]
    text_indices = [index for index, image in enumerate(has_image) if not image]
    if not image_indices or not text_indices:
        return length_grouped_indices(lengths, batch_size, world_size, generator)
    megabatch_size = batch_size * world_size
    full_megabatches, leftovers = [], []
    for indices in (image_indices, text_indices):
        local_order = length_grouped_indices([lengths[index] for index in indices], batch_size, world_size, generator)
        ordered = [indices[position] for position in local_order]
        full_count = len(ordered) // megabatch_size * megabatch_size
        full_megabatches += [ordered[start : start + megabatch_size] for start in range(0, full_count, megabatch_size)]
        leftovers += ordered[full_count:]
    megabatch_order = torch.randperm(len(full_megabatches), generator=generator).tolist()
    return [index for position in megabatch_order for index in full_megabatches[position]] + leftovers


class ModalityLengthGroupedSampler(Sampler[int]):
    """Sampler for the HF Trainer that groups batches by modality and length (LLaVA's recipe).

    Args:
        lengths: an estimated length per sample (`LlavaSupervisedDataset.lengths`).
        has_image: whether each sample has an image (`LlavaSupervisedDataset.has_image`); ignored
            when `group_by_modality` is False.
        batch_size: the per-device batch size.
        world_size: how many per-device batches make one optimizer step: the number of processes
            times the gradient accumulation steps, as LLaVA passes it.
        seed: with the epoch (`set_epoch`), fixes the order; every process must use the same seed.
        group_by_modality: False groups by length only (e.g. stage 1, where every sample has an image).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        has_image: Sequence[bool] | None = None,
        *,
        batch_size: int,
        world_size: int = 1,
        seed: int = 0,
        group_by_modality: bool = True,
    ):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be at least 1, got {batch_size} and {world_size}.")
        if group_by_modality and (has_image is None or len(has_image) != len(lengths)):
            raise ValueError("group_by_modality needs has_image with one entry per length.")
        self.lengths = list(lengths)
        self.has_image = list(has_image) if has_image is not None else None
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.group_by_modality = group_by_modality
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch`; the HF Trainer (through accelerate) calls this every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        if self.group_by_modality:
            indices = modality_length_grouped_indices(
                self.lengths, self.has_image, self.batch_size, self.world_size, generator
            )
        else:
            indices = length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator)
        return iter(indices)
