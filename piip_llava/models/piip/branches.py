"""Branch adapters: a pretrained transformers backbone seen as an embedding step plus a list of blocks.

Every branch maps an image to a `BranchState` (tokens on a grid, plus an optional class token)
and runs any contiguous range of its blocks on that state. The pyramid model only ever talks to
branches through this interface, so ViT-style and convolutional (ConvNeXt, ResNet) backbones mix
freely.

Each adapter is a small `PreTrainedModel` whose config is the branch's backbone sub-config (the very
object inside `PIIPVisionConfig.branches[i]`), so `set_attn_implementation`, dtype and device
handling, `_no_split_modules` and weight initialisation reach it as they reach any transformers
sub-model. Adapters are registered by backbone `model_type` with `register_branch_adapter`; a new
branch type is an adapter class here plus its family in `configuration_piip.BRANCH_FAMILIES`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPVisionEmbeddings
from transformers.models.convnext.modeling_convnext import ConvNextEmbeddings, ConvNextLayer, ConvNextStage
from transformers.models.resnet.modeling_resnet import ResNetEmbeddings, ResNetEncoder
from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipEncoderLayer, SiglipVisionEmbeddings

from .configuration_piip import PIIPBranchConfig

BRANCH_ADAPTERS: dict[str, type[PIIPBranchModel]] = {}


def register_branch_adapter(*model_types: str):
    """Class decorator: the adapter builds branches whose backbone has one of `model_types`."""

    def register(adapter_class: type[PIIPBranchModel]) -> type[PIIPBranchModel]:
        for model_type in model_types:
            BRANCH_ADAPTERS[model_type] = adapter_class
        return adapter_class

    return register


def build_branch(branch_config: PIIPBranchConfig) -> PIIPBranchModel:
    adapter_class = BRANCH_ADAPTERS.get(branch_config.backbone_type)
    if adapter_class is None:
        raise ValueError(
            f"No branch adapter for backbone type {branch_config.backbone_type!r}; registered: {', '.join(BRANCH_ADAPTERS)}."
        )
    return adapter_class(branch_config)


@dataclass
class BranchState:
    """A branch's activations between blocks: tokens (batch, H*W, C) on an H x W grid."""

    tokens: torch.Tensor
    grid: tuple[int, int]
    class_token: torch.Tensor | None = None  # (batch, 1, C), carried beside the grid tokens

    def feature_map(self) -> torch.Tensor:
        """The tokens as a (batch, C, H, W) map."""
        batch, _, channels = self.tokens.shape
        return self.tokens.transpose(1, 2).reshape(batch, channels, *self.grid)

    def sequence(self) -> torch.Tensor:
        """(batch, [1 +] H*W, C): the class token (if carried) followed by the grid tokens, as a hidden state."""
        if self.class_token is None:
            return self.tokens
        return torch.cat([self.class_token, self.tokens], dim=1)


def tokens_from_map(feature_map: torch.Tensor) -> torch.Tensor:
    """A (batch, C, H, W) map as contiguous (batch, H*W, C) tokens, ready for a Linear layer."""
    return feature_map.flatten(2).transpose(1, 2).contiguous()


class PIIPBranchModel(PreTrainedModel):
    """What every branch adapter shares; `config` is the branch's backbone config.

    Subclasses build `embed(pixel_values) -> BranchState`, `run_blocks(state, first, last)` and
    `num_blocks`, and initialise their own layers in `_init_weights`.
    """

    config_class = PreTrainedConfig
    base_model_prefix = "branch"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, branch_config: PIIPBranchConfig):
        super().__init__(branch_config.backbone_config)
        self.image_size = branch_config.image_size

    @property
    def initializer_range(self) -> float:
        return getattr(self.config, "initializer_range", 0.02)

    def _init_weights(self, module: nn.Module) -> None:
        init_common_layer(module, self.initializer_range)


def init_common_layer(module: nn.Module, std: float) -> None:
    """The initialisation every part of the encoder shares: truncated-normal Linears, normal convolutions and
    embeddings, unit norms."""
    if isinstance(module, nn.Linear):
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


def interpolate_position_grid(grid_embedding: torch.Tensor, target_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a (G*G, C) position table to the target grid, bicubically in fp32; returns (H*W, C)."""
    num_positions, channels = grid_embedding.shape
    side = round(num_positions**0.5)
    if side * side != num_positions:
        raise ValueError(f"Position embedding with {num_positions} entries is not a square grid.")
    if (side, side) == tuple(target_grid):
        return grid_embedding
    table = grid_embedding.float().reshape(1, side, side, channels).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=target_grid, mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(-1, channels).to(grid_embedding.dtype)


@dataclass(frozen=True)
class ViTFamily:
    """What differs between ViT families that share the adapter."""

    embeddings_class: type
    layer_class: type
    has_class_token: bool
    has_pre_layernorm: bool


VIT_FAMILIES = {
    "clip_vision_model": ViTFamily(CLIPVisionEmbeddings, CLIPEncoderLayer, has_class_token=True, has_pre_layernorm=True),
    "siglip_vision_model": ViTFamily(
        SiglipVisionEmbeddings, SiglipEncoderLayer, has_class_token=False, has_pre_layernorm=False
    ),
}


@register_branch_adapter(*VIT_FAMILIES)
class ViTBranch(PIIPBranchModel):
    """CLIP or SigLIP vision transformer as a PIIP branch (no post-LayerNorm, no pooling head).

    The embeddings are built for the branch's patch kernel and the pretrained position grid
    (`pretrain_grid_size`, interpolated at run time); the patch convolution runs at `patch_stride`.
    """

    _no_split_modules = ["CLIPEncoderLayer", "SiglipEncoderLayer"]
    _input_embed_layer = "patch_embedding"
    _can_record_outputs = {"attentions": [CLIPAttention, SiglipAttention]}

    def __init__(self, branch_config: PIIPBranchConfig):
        super().__init__(branch_config)
        family = VIT_FAMILIES[branch_config.backbone_type]
        config = self.config
        self.patch_size = branch_config.patch_size
        self.has_class_token = family.has_class_token
        self.use_cls_token = branch_config.use_cls_token and family.has_class_token
        self.embeddings = family.embeddings_class(embedding_config(branch_config))
        self.embeddings.patch_embedding.stride = (branch_config.patch_stride, branch_config.patch_stride)
        self.pre_layernorm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if family.has_pre_layernorm else nn.Identity()
        )
        self.layers = nn.ModuleList([family.layer_class(config) for _ in range(config.num_hidden_layers)])
        # grid -> (cache key, interpolated table); see `patch_position_embeddings`.
        self._position_cache: dict[tuple[int, int], tuple[tuple, torch.Tensor]] = {}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (CLIPVisionEmbeddings, SiglipVisionEmbeddings)):
            if isinstance(module, CLIPVisionEmbeddings):
                init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5)
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    def position_embeddings(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(H*W, C) patch position embeddings for `grid` and the class position (C,) if any."""
        table = self.embeddings.position_embedding.weight
        class_position = table[0] if self.has_class_token else None
        return self.patch_position_embeddings(table, grid), class_position

    def patch_position_embeddings(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The pretrained patch positions interpolated to `grid`, reused while the table cannot have changed.

        The interpolation depends on the weights, so a cached result is used only in eval mode
        without autograd on the table, and only while the table is the same tensor (`data_ptr`)
        at the same version (`_version` counts in-place writes: `load_state_dict`, optimizer
        steps, `copy_`). Writes through `.data` bypass the version counter; call
        `clear_position_cache()` after those.
        """
        patch_table = table[1:] if self.has_class_token else table
        needs_graph = torch.is_grad_enabled() and table.requires_grad
        if self.training or needs_graph or torch.compiler.is_compiling():
            return interpolate_position_grid(patch_table, grid)
        key = (table.data_ptr(), table._version, table.dtype, table.device, torch.is_inference_mode_enabled())
        cached = self._position_cache.get(grid)
        if cached is not None and cached[0] == key:
            return cached[1]
        positions = interpolate_position_grid(patch_table, grid)
        self._position_cache[grid] = (key, positions)
        return positions

    def clear_position_cache(self) -> None:
        self._position_cache.clear()

    def embed(self, pixel_values: torch.Tensor) -> BranchState:
        patch_embedding = self.embeddings.patch_embedding
        patches = patch_embedding(pixel_values.to(patch_embedding.weight.dtype))  # (batch, C, H, W)
        grid = tuple(patches.shape[-2:])
        tokens = patches.flatten(2).transpose(1, 2)  # (batch, H*W, C)
        patch_positions, class_position = self.position_embeddings(grid)
        tokens = tokens + patch_positions.to(tokens.dtype)
        if not self.has_class_token:
            return BranchState(tokens=self.pre_layernorm(tokens), grid=grid)
        class_token = (self.embeddings.class_embedding + class_position).to(tokens.dtype)
        class_token = class_token.expand(tokens.shape[0], 1, -1)
        sequence = self.pre_layernorm(torch.cat([class_token, tokens], dim=1))
        class_token = sequence[:, :1] if self.use_cls_token else None
        return BranchState(tokens=sequence[:, 1:], grid=grid, class_token=class_token)

    def run_blocks(self, state: BranchState, first: int, last: int, hidden_states: list | None = None) -> BranchState:
        """Blocks `first..last` on `state`; each block's output is appended to `hidden_states` when given."""
        has_class = state.class_token is not None
        hidden = state.sequence()
        for layer in self.layers[first : last + 1]:
            hidden = layer(hidden, None)
            if hidden_states is not None:
                hidden_states.append(hidden)
        if has_class:
            return BranchState(tokens=hidden[:, 1:], grid=state.grid, class_token=hidden[:, :1])
        return BranchState(tokens=hidden, grid=state.grid)


def embedding_config(branch_config: PIIPBranchConfig) -> PreTrainedConfig:
    """The backbone config as the embeddings need it: the branch's patch kernel and the pretrained position
    grid (so the tables have the stored shapes)."""
    config = copy.deepcopy(branch_config.backbone_config)
    config.patch_size = branch_config.patch_size
    config.image_size = branch_config.pretrain_grid_size * branch_config.patch_size
    return config


class ConvolutionalBranch(PIIPBranchModel):
    """What every convolutional branch shares: its blocks map a (batch, C, H, W) map to another, which
    may change the grid and the width, so the state is rebuilt from the feature map after each range.

    Subclasses build `self.blocks` (a plain list, so parameters stay registered under their own
    names) and `embed`.
    """

    gradient_checkpointing = False
    blocks: list[nn.Module]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _run_block(self, block: nn.Module, feature_map: torch.Tensor) -> torch.Tensor:
        return block(feature_map)

    def run_blocks(self, state: BranchState, first: int, last: int, hidden_states: list | None = None) -> BranchState:
        """Blocks `first..last` on `state`; each block's output tokens are appended to `hidden_states` when given."""
        feature_map = state.feature_map()
        for block in self.blocks[first : last + 1]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                feature_map = self._gradient_checkpointing_func(self._run_block, block, feature_map)
            else:
                feature_map = self._run_block(block, feature_map)
            if hidden_states is not None:
                hidden_states.append(tokens_from_map(feature_map))
        return _state_from_map(feature_map)


@register_branch_adapter("convnext")
class ConvNextBranch(ConvolutionalBranch):
    """transformers' ConvNext as a PIIP branch.

    Its blocks are, stage by stage, the stage's downsampling layer (stages 2-4) followed by the
    stage's ConvNeXt layers.
    """

    _no_split_modules = ["ConvNextLayer"]
    _input_embed_layer = "patch_embeddings"

    def __init__(self, branch_config: PIIPBranchConfig):
        super().__init__(branch_config)
        config = self.config
        self.embeddings = ConvNextEmbeddings(config)
        layer_rates = linear_rates(config.drop_path_rate, sum(config.depths))
        stage_starts = [sum(config.depths[:stage]) for stage in range(len(config.depths))]
        self.stages = nn.ModuleList()
        in_channels = config.hidden_sizes[0]
        for stage_index, (depth, out_channels) in enumerate(zip(config.depths, config.hidden_sizes)):
            self.stages.append(
                ConvNextStage(
                    config,
                    in_channels=in_channels,
                    out_channels=out_channels,
                    stride=2 if stage_index > 0 else 1,
                    depth=depth,
                    drop_path_rates=layer_rates[stage_starts[stage_index] : stage_starts[stage_index] + depth],
                )
            )
            in_channels = out_channels
        self.blocks = self._flat_blocks()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ConvNextLayer) and module.layer_scale_parameter is not None:
            init.constant_(module.layer_scale_parameter, self.config.layer_scale_init_value)

    def _flat_blocks(self) -> list[nn.Module]:
        blocks = []
        for stage in self.stages:
            if len(stage.downsampling_layer):
                blocks.append(stage.downsampling_layer)
            blocks.extend(stage.layers)
        return blocks

    def embed(self, pixel_values: torch.Tensor) -> BranchState:
        weight = self.embeddings.patch_embeddings.weight
        return _state_from_map(self.embeddings(pixel_values.to(weight.dtype)))

    def _run_block(self, block: nn.Module, feature_map: torch.Tensor) -> torch.Tensor:
        if isinstance(block, nn.ModuleList):  # a downsampling layer: LayerNorm then strided conv
            for layer in block:
                feature_map = layer(feature_map)
            return feature_map
        return block(feature_map)


@register_branch_adapter("resnet")
class ResNetBranch(ConvolutionalBranch):
    """transformers' ResNet (basic or bottleneck layers, batch norm) as a PIIP branch.

    Its blocks are the residual layers, stage by stage; the first layer of stages 2-4 downsamples.
    Batch norm and full 3x3 convolutions make it learn far faster from random weights than a
    ConvNeXt or a ViT of the same cost, which is what a model trained from nothing on a CPU needs.
    Parameter names are `ResNetModel`'s, with `encoder.` dropped.
    """

    _no_split_modules = ["ResNetBasicLayer", "ResNetBottleNeckLayer"]

    def __init__(self, branch_config: PIIPBranchConfig):
        super().__init__(branch_config)
        self.embedder = ResNetEmbeddings(self.config)
        self.stages = ResNetEncoder(self.config).stages
        self.blocks = [layer for stage in self.stages for layer in stage.layers]

    def _init_weights(self, module: nn.Module) -> None:
        """ResNet's own He init for convolutions and unit batch norms, as transformers' ResNet does."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedder.embedder.convolution

    def embed(self, pixel_values: torch.Tensor) -> BranchState:
        weight = self.embedder.embedder.convolution.weight
        return _state_from_map(self.embedder(pixel_values.to(weight.dtype)))


def _state_from_map(feature_map: torch.Tensor) -> BranchState:
    return BranchState(tokens=tokens_from_map(feature_map), grid=tuple(feature_map.shape[-2:]))


def linear_rates(last: float, count: int) -> list[float]:
    """`count` rates rising linearly from 0 to `last` (stochastic depth schedules), in plain Python so
    that models can be built on the meta device."""
    if count <= 1:
        return [0.0] * count
    return [last * index / (count - 1) for index in range(count)]
