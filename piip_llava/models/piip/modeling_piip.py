"""PyTorch PIIP vision encoder: several backbones, one image at several resolutions, joined by interactions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging
from transformers.utils.output_capturing import capture_outputs

from .branches import (
    BranchState,
    ConvNextBranch,
    PIIPBranchModel,
    ResNetBranch,
    ViTBranch,
    build_branch,
    init_common_layer,
    linear_rates,
)
from .configuration_piip import PIIPVisionConfig
from .interactions import BidirectionalInteractionUnit, DeformableCrossAttention, Injector
from .pretrained_branches import build_from_pretrained_branches

logger = logging.get_logger(__name__)


@dataclass
class PIIPVisionModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor`): the last (highest-resolution) branch's final tokens,
            (batch, H*W, C), row-major; C is `config.hidden_size`.
        feature_maps (`tuple[torch.FloatTensor]`): each branch's final tokens as a (batch, C_i, H_i, W_i)
            map, in branch order (largest model / lowest resolution first).
        class_tokens (`tuple[torch.FloatTensor | None]`): each branch's final class token (batch, C_i),
            or None for branches without one.
        hidden_states (`tuple[torch.FloatTensor]`, *optional*): with `output_hidden_states`, every branch's
            hidden states, branch after branch in branch order (`PIIPVisionModel.per_branch` regroups them):
            for each branch its embedding output, then the output of each block in block order, as
            (batch, tokens, C) sequences (a carried class token first; a convolutional branch's grid
            flattened row-major, its width that of the block's stage). A block's output is taken before the
            interaction that follows its group updates the branch. The last entry is the last branch's
            final block output.
        attentions (`tuple[torch.FloatTensor]`, *optional*): with `output_attentions` (eager attention), every
            ViT branch's (batch, heads, tokens, tokens) attention maps, branch after branch in branch order,
            layers in order; convolutional branches have none.
    """

    last_hidden_state: torch.FloatTensor | None = None
    feature_maps: tuple[torch.FloatTensor, ...] | None = None
    class_tokens: tuple[torch.FloatTensor | None, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def interaction_widths(config: PIIPVisionConfig, interaction_index: int) -> list[int]:
    """Each branch's token width after the last block of its `interaction_index`-th group."""
    return [
        branch.geometry_after_block(branch.interaction_groups[interaction_index][1])[0] for branch in config.branches
    ]


class PIIPInteraction(nn.Module):
    """The bidirectional units that run after one group of blocks, one per adjacent branch pair."""

    def __init__(self, config: PIIPVisionConfig, branch_widths: list[int], drop_path: float):
        """`branch_widths`: each branch's token width where this interaction runs, largest model first."""
        super().__init__()
        self.units = nn.ModuleList(
            [
                BidirectionalInteractionUnit(config, branch_widths[pair], branch_widths[pair + 1], drop_path)
                for pair in range(len(branch_widths) - 1)
            ]
        )

    def forward(self, states: list[BranchState]) -> list[BranchState]:
        states = list(states)
        # Highest-resolution pair first, as in the reference implementation: (N-1, N), ..., (1, 2).
        for pair in reversed(range(len(self.units))):
            state_a, state_b = states[pair], states[pair + 1]
            tokens_a, tokens_b = self.units[pair](state_a.tokens, state_a.grid, state_b.tokens, state_b.grid)
            states[pair] = BranchState(tokens_a, state_a.grid, state_a.class_token)
            states[pair + 1] = BranchState(tokens_b, state_b.grid, state_b.class_token)
        return states


class PIIPPreTrainedModel(PreTrainedModel):
    config: PIIPVisionConfig
    config_class = PIIPVisionConfig
    base_model_prefix = "piip"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # The branches add their own layers (see `PIIPVisionModel.__init__`).
    _no_split_modules = ["BidirectionalInteractionUnit"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Interaction layers as the reference implementation initialises them.

        Each branch is a sub-model with its own `_init_weights`. transformers applies this to
        children before parents and skips modules without parameters of their own, so the
        deformable attention is initialised from its parent injector, after (and over) the
        generic Linear initialisation of its layers.
        """
        if isinstance(module, Injector):
            init.zeros_(module.attn_gate)
            if module.with_cffn:
                init.zeros_(module.ffn_gate)
            if isinstance(module.attn, DeformableCrossAttention):
                init_deformable_attention(module.attn)
        else:
            init_common_layer(module, self.config.initializer_range)


def init_deformable_attention(module: DeformableCrossAttention) -> None:
    """Zero offsets and attention logits, head-direction offset biases, xavier value/output projections."""
    init.zeros_(module.sampling_offsets.weight)
    init.copy_(module.sampling_offsets.bias, module.initial_offset_bias())
    init.zeros_(module.attention_weights.weight)
    init.zeros_(module.attention_weights.bias)
    init.xavier_uniform_(module.value_proj.weight)
    init.zeros_(module.value_proj.bias)
    init.xavier_uniform_(module.output_proj.weight)
    init.zeros_(module.output_proj.bias)


class PIIPVisionModel(PIIPPreTrainedModel):
    """The PIIP encoder: returns every branch's final feature map (see `PIIPVisionModelOutput`).

    With `output_hidden_states` it also returns each branch's hidden states and with
    `output_attentions` (eager attention) each ViT branch's attention maps, branch after branch;
    see `PIIPVisionModelOutput` for the order, and `per_branch` to regroup them.
    """

    _can_record_outputs = {"attentions": []}  # recorded by the ViT branches (`ViTBranch._can_record_outputs`)

    def __init__(self, config: PIIPVisionConfig):
        super().__init__(config)
        for branch_config in config.branches:  # the branches attend as the encoder does
            branch_config.backbone_config._attn_implementation_internal = config._attn_implementation
        self.branches = nn.ModuleList([build_branch(branch_config) for branch_config in config.branches])
        drop_path_rates = linear_rates(config.interaction_drop_path_rate, config.num_interactions)
        self.interactions = nn.ModuleList(
            [
                PIIPInteraction(config, interaction_widths(config, index), drop_path_rates[index])
                for index in range(config.num_interactions)
            ]
        )
        # device_map must not split a branch's layers; post_init only gathers this from direct children.
        self._no_split_modules = sorted(
            set(self._no_split_modules).union(*(branch._no_split_modules for branch in self.branches))
        )
        self.post_init()

    @classmethod
    def from_pretrained_branches(
        cls,
        branch_dirs: list,
        image_sizes: list[int],
        interaction_groups: list[list[list[int]]],
        patch_sizes: list[int | None] | None = None,
        **config_kwargs,
    ) -> PIIPVisionModel:
        """Build the encoder from saved backbones (e.g. a `CLIPVisionModel` and a `ConvNextModel` directory).

        The interactions are freshly initialised with zero gates, so the result computes exactly
        what the backbones compute alone until it is trained. A resampled patch kernel runs at a
        stride equal to its size. See `pretrained_branches.py`.
        """
        return build_from_pretrained_branches(
            cls, branch_dirs, image_sizes, interaction_groups, patch_sizes, **config_kwargs
        )

    def get_input_embeddings(self) -> nn.Module:
        """The first branch's patch embedding. `enable_input_require_grads` hooks every branch's own, as each branch
        is a sub-model exposing its patch embedding."""
        return self.branches[0].get_input_embeddings()

    def train(self, mode: bool = True) -> PIIPVisionModel:
        """Training mode, except for batch-norm layers whose weights are frozen.

        A frozen ResNet branch should compute what it computed when it was trained; in training mode
        its batch norms would normalise with each batch's statistics and overwrite their running ones,
        so they stay in evaluation mode, as frozen backbones with batch norm usually do.
        """
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d) and module.weight is not None and not module.weight.requires_grad:
                    module.eval()
        return self

    def resize_for_branches(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The input at each branch's resolution (bilinear, align_corners=False, no antialiasing)."""
        resized = []
        for branch in self.branches:
            size = branch.image_size
            if pixel_values.shape[-1] == size and pixel_values.shape[-2] == size:
                resized.append(pixel_values)
            else:
                resized.append(F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False))
        return resized

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be a (batch, 3, height, width) tensor, got shape {tuple(pixel_values.shape)}."
            )
        if pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have 3 (RGB) channels, got {pixel_values.shape[1]}.")
        expected = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (expected, expected):
            raise ValueError(
                f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but this PIIP encoder takes "
                f"{expected}x{expected} images (its highest branch resolution); use PIIPImageProcessor."
            )

    def compilable_blocks(self) -> list[nn.Module]:
        """The modules `compile_blocks` compiles: every transformer / ConvNeXt / ResNet layer and every interaction unit."""
        blocks = []
        for branch in self.branches:
            if isinstance(branch, ViTBranch):
                blocks.extend(branch.layers)
            else:  # ConvNeXt downsampling layers are bare LayerNorm + conv lists: left eager
                blocks.extend(block for block in branch.blocks if not isinstance(block, nn.ModuleList))
        blocks.extend(unit for interaction in self.interactions for unit in interaction.units)
        return blocks

    def compile_blocks(self, **compile_options) -> PIIPVisionModel:
        """Compile the encoder's blocks in place with `torch.compile`; returns the model.

        Each block is compiled on its own (`nn.Module.compile`), so parameter names, `state_dict`
        and saved checkpoints do not change, blocks of one kind share compiled code, and the
        bookkeeping between blocks (block groups, class tokens) stays plain Python. The options
        go to `torch.compile`, e.g. `backend="aot_eager"` or `mode="max-autotune"`.
        """
        for block in self.compilable_blocks():
            block.compile(**compile_options)
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> PIIPVisionModelOutput | tuple:
        r"""
        pixel_values (`torch.Tensor` of shape `(batch, 3, image_size, image_size)`): images at the encoder's
            resolution (`config.image_size`), as `PIIPImageProcessor` makes them.
        output_hidden_states (`bool`, *optional*): also return every branch's hidden states.
        output_attentions (`bool`, *optional*): also return every ViT branch's attention maps (eager attention).
        return_dict (`bool`, *optional*): `False` returns a tuple of the output's fields that are set.
        """
        self.check_pixel_values(pixel_values)
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output = self.run_pyramid(
            pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        if output_attentions:
            output.attentions = self.attentions_in_branch_order(output.attentions)
        return output if return_dict else output.to_tuple()

    @capture_outputs
    def run_pyramid(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> PIIPVisionModelOutput:
        """The encoder's computation; `capture_outputs` records the ViT branches' attention maps in the order the
        layers run (interaction group by group, branch by branch)."""
        states = [branch.embed(image) for branch, image in zip(self.branches, self.resize_for_branches(pixel_values))]
        hidden_states = [[state.sequence()] for state in states] if output_hidden_states else None
        for interaction_index, interaction in enumerate(self.interactions):
            states = [
                branch.run_blocks(
                    state,
                    *branch_config.interaction_groups[interaction_index],
                    hidden_states=None if hidden_states is None else hidden_states[index],
                )
                for index, (branch, branch_config, state) in enumerate(zip(self.branches, self.config.branches, states))
            ]
            states = interaction(states)
        feature_maps = tuple(state.feature_map() for state in states)
        return PIIPVisionModelOutput(
            last_hidden_state=feature_maps[-1].flatten(2).transpose(1, 2),  # (batch, H*W, C)
            feature_maps=feature_maps,
            class_tokens=tuple(None if state.class_token is None else state.class_token[:, 0] for state in states),
            hidden_states=None if hidden_states is None else tuple(state for branch in hidden_states for state in branch),
        )

    def attentions_in_branch_order(self, attentions: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The attention maps recorded in running order (group by group), reordered branch after branch.

        Only eager attention computes the maps; with another implementation none are recorded and, as in
        transformers' own models, the tuple is empty (with a warning saying how to get them).
        """
        attention_branches = [index for index, branch in enumerate(self.branches) if isinstance(branch, ViTBranch)]
        expected = sum(self.branches[index].num_blocks for index in attention_branches)
        if len(attentions) != expected:
            logger.warning_once(
                f"output_attentions returned {len(attentions)} of {expected} attention maps with "
                f"attn_implementation={self.config._attn_implementation!r}: only eager attention computes them; load "
                "the model with attn_implementation='eager' or call set_attn_implementation('eager')."
            )
            return tuple(attentions)
        by_branch = [[] for _ in self.branches]
        remaining = iter(attentions)
        for interaction_index in range(self.config.num_interactions):
            for index in attention_branches:
                first, last = self.config.branches[index].interaction_groups[interaction_index]
                by_branch[index].extend(next(remaining) for _ in range(last - first + 1))
        return tuple(attention for branch in by_branch for attention in branch)

    def per_branch(self, outputs: tuple[torch.Tensor, ...], kind: str = "hidden_states") -> tuple[tuple, ...]:
        """`hidden_states` or `attentions` of a `PIIPVisionModelOutput` grouped into one tuple per branch."""
        if kind == "hidden_states":
            counts = [1 + branch.num_blocks for branch in self.branches]
        elif kind == "attentions":
            counts = [branch.num_blocks if isinstance(branch, ViTBranch) else 0 for branch in self.branches]
        else:
            raise ValueError(f"kind must be 'hidden_states' or 'attentions', got {kind!r}.")
        if len(outputs) != sum(counts):
            raise ValueError(f"Expected {sum(counts)} {kind} for branches of {counts}, got {len(outputs)}.")
        starts = [sum(counts[:index]) for index in range(len(counts))]
        return tuple(tuple(outputs[start : start + count]) for start, count in zip(starts, counts))


__all__ = [
    "ConvNextBranch",
    "PIIPBranchModel",
    "PIIPPreTrainedModel",
    "PIIPVisionModel",
    "PIIPVisionModelOutput",
    "ResNetBranch",
    "ViTBranch",
]
