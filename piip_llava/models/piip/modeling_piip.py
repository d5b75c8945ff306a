"""PyTorch PIIP vision encoder: several backbones, one image at several resolutions, joined by interactions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
from transformers.models.convnext.modeling_convnext import ConvNextLayer
from transformers.utils import ModelOutput, logging

from .branches import BranchState, ConvNextBranch, ResNetBranch, ViTBranch, build_branch, linear_rates
from .configuration_piip import PIIPVisionConfig
from .interactions import BidirectionalInteractionUnit, DeformableCrossAttention, Injector
from .pretrained_branches import build_from_pretrained_branches

logger = logging.get_logger(__name__)


@dataclass
class PIIPVisionModelOutput(ModelOutput):
    """
    Args:
        feature_maps (`tuple[torch.FloatTensor]`): each branch's final tokens as a (batch, C_i, H_i, W_i)
            map, in branch order (largest model / lowest resolution first).
        class_tokens (`tuple[torch.FloatTensor | None]`): each branch's final class token (batch, C_i),
            or None for branches without one.
    """

    feature_maps: tuple[torch.FloatTensor, ...] | None = None
    class_tokens: tuple[torch.FloatTensor | None, ...] | None = None


class PIIPInteraction(nn.Module):
    """The bidirectional units that run after one group of blocks, one per adjacent branch pair."""

    def __init__(self, config: PIIPVisionConfig, interaction_index: int, drop_path: float):
        super().__init__()
        specs = config.branch_specs
        units = []
        for pair in range(len(specs) - 1):
            last_a = specs[pair].interaction_groups[interaction_index][1]
            last_b = specs[pair + 1].interaction_groups[interaction_index][1]
            dim_a = specs[pair].geometry_after_block(last_a)[0]
            dim_b = specs[pair + 1].geometry_after_block(last_b)[0]
            units.append(BidirectionalInteractionUnit(config, dim_a, dim_b, drop_path))
        self.units = nn.ModuleList(units)

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
    _no_split_modules = [
        "CLIPEncoderLayer",
        "SiglipEncoderLayer",
        "ConvNextLayer",
        "ResNetBasicLayer",
        "ResNetBottleNeckLayer",
        "BidirectionalInteractionUnit",
    ]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Interaction layers as the reference implementation initialises them; backbone layers the usual way.

        transformers applies this to children before parents and skips modules without parameters
        of their own, so the deformable attention is initialised from its parent injector, after
        (and over) the generic Linear initialisation of its layers.
        """
        std = self.config.initializer_range
        if isinstance(module, Injector):
            init.zeros_(module.attn_gate)
            if module.with_cffn:
                init.zeros_(module.ffn_gate)
            if isinstance(module.attn, DeformableCrossAttention):
                init_deformable_attention(module.attn)
        elif isinstance(module, CLIPVisionEmbeddings):
            init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5)
        elif isinstance(module, ConvNextLayer):
            if module.layer_scale_parameter is not None:
                init.constant_(module.layer_scale_parameter, self.convnext_layer_scale_init())
        elif isinstance(module, nn.Conv2d) and self.is_resnet_convolution(module):
            # ResNet's own He init rather than the small normal init below, as transformers' ResNet does.
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv2d, nn.Embedding)):
            init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def is_resnet_convolution(self, module: nn.Module) -> bool:
        """Whether `module` belongs to a ResNet branch. Asked of the convolution itself: the init pass
        skips modules without parameters of their own, such as ResNet's conv + norm layers."""
        resnet_branches = [branch for branch in getattr(self, "branches", ()) if isinstance(branch, ResNetBranch)]
        return any(module is candidate for branch in resnet_branches for candidate in branch.modules())

    def convnext_layer_scale_init(self) -> float:
        values = [
            spec.backbone_config.get("layer_scale_init_value", 1e-6) for spec in self.config.branch_specs if spec.is_convnext
        ]
        return values[0] if values else 1e-6


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
    """The PIIP encoder: returns every branch's final feature map (see `PIIPVisionModelOutput`)."""

    def __init__(self, config: PIIPVisionConfig):
        super().__init__(config)
        attn_implementation = config._attn_implementation
        self.branches = nn.ModuleList([build_branch(spec, attn_implementation) for spec in config.branch_specs])
        drop_path_rates = linear_rates(config.interaction_drop_path_rate, config.num_interactions)
        self.interactions = nn.ModuleList(
            [PIIPInteraction(config, index, drop_path_rates[index]) for index in range(config.num_interactions)]
        )
        # Each branch's [first, last] block range per interaction, read once (the config rebuilds specs on access).
        self.branch_block_ranges = [spec.interaction_groups for spec in config.branch_specs]
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
        what the backbones compute alone until it is trained. See `pretrained_branches.py`.
        """
        return build_from_pretrained_branches(branch_dirs, image_sizes, interaction_groups, patch_sizes, **config_kwargs)

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

    def sync_branch_attention(self) -> None:
        """Make every ViT branch use the encoder's attention implementation (`sdpa` unless chosen otherwise).

        The branches keep their own backbone configs, which `set_attn_implementation` (on this model
        or on a PIIP-LLaVA around it) does not reach; the current choice is copied over before each run.
        """
        wanted = self.config._attn_implementation
        for branch in self.branches:
            if isinstance(branch, ViTBranch) and branch.backbone_config._attn_implementation != wanted:
                branch.backbone_config._attn_implementation = wanted

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

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs) -> PIIPVisionModelOutput:
        self.check_pixel_values(pixel_values)
        self.sync_branch_attention()
        states = [branch.embed(image) for branch, image in zip(self.branches, self.resize_for_branches(pixel_values))]
        for interaction_index, interaction in enumerate(self.interactions):
            states = [
                branch.run_blocks(state, *block_ranges[interaction_index])
                for branch, state, block_ranges in zip(self.branches, states, self.branch_block_ranges)
            ]
            states = interaction(states)
        output = PIIPVisionModelOutput(
            feature_maps=tuple(state.feature_map() for state in states),
            class_tokens=tuple(None if state.class_token is None else state.class_token[:, 0] for state in states),
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = [
    "ConvNextBranch",
    "PIIPPreTrainedModel",
    "PIIPVisionModel",
    "PIIPVisionModelOutput",
    "ResNetBranch",
    "ViTBranch",
]
