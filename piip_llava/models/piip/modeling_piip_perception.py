"""PIIP for visual perception: the N-branch pyramid, its classification heads and its dense backbone.

The ViT branches' layers are transformers' own: DeiT / DeiT III blocks are `Dinov2Layer`
(LayerNorm, attention, layer scale, exact-GELU MLP), and so are Uni-Perceiver's (LayerNorm eps
1e-5); AugReg / DINOv2 / MAE / InternViT blocks are `InternVLVisionLayer` (LayerNorm or RMSNorm,
qk-norm across all heads, layer scale, exact or tanh GELU); BEiT blocks are `BeitLayer` (q / v
biases, layer scale; the relative position bias of each layer's window is the branch's
`WindowRelativePositionBias`). ConvNeXt branches (the official ConvNeXt detection configs) are the
LLaVA encoder's own ConvNeXt branch adapter (`branches.ConvNextBranch`, transformers' ConvNext
layers). What is PIIP's own lives here: the ViT branch embedding (a patch convolution and a
position table added as stored or resized per forward), windowed attention with the official
padding semantics, the interactions (shared with the LLaVA encoder), the classification heads and
the merged multi-scale outputs, from one merged map or, without the simple FPN, from the maps
merged after chosen interactions. See `PIIP_PERCEPTION_SPEC.md`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BeitConfig, Dinov2Config, InternVLVisionConfig, PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput, ImageClassifierOutput
from transformers.models.beit.modeling_beit import BeitLayer
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer
from transformers.models.internvl.modeling_internvl import InternVLVisionLayer, InternVLVisionRMSNorm

from .branches import BranchState, ConvNextBranch, build_branch, interpolate_position_grid, linear_rates
from .configuration_piip_perception import STAGE_NAMES, PerceptionBranchConfig, PIIPPerceptionConfig
from .interactions import DeformableCrossAttention, Injector
from .modeling_piip import PIIPInteraction, PIIPVisionModelOutput, init_deformable_attention

Grid = tuple[int, int]
CONVNEXT_TOTAL_STRIDE = 32  # stem 4, then three stages that halve the grid
NORM_EPS = 1e-6  # every norm inside the official ViT branches and heads
UNIPERCEIVER_NORM_EPS = 1e-5  # Uni-Perceiver's nn.LayerNorm defaults (det/uniperceiver.py)
GROUP_NORM_GROUPS = 32


def branch_norm(branch: PerceptionBranchConfig, width: int | None = None) -> nn.Module:
    width = width or branch.hidden_size
    if branch.norm_type == "rms_norm":
        return InternVLVisionRMSNorm(width, eps=NORM_EPS)
    return nn.LayerNorm(width, eps=NORM_EPS)


def layer_configs(branch: PerceptionBranchConfig, attn_implementation: str | None) -> list:
    """One transformers config per layer (each layer has its own stochastic-depth rate)."""
    if branch.branch_type in ("deit", "uniperceiver"):
        base = Dinov2Config(
            hidden_size=branch.hidden_size,
            num_hidden_layers=branch.num_hidden_layers,
            num_attention_heads=branch.num_attention_heads,
            mlp_ratio=int(branch.mlp_ratio),  # Dinov2Config takes an int; validated integral
            qkv_bias=branch.qkv_bias,
            layer_norm_eps=UNIPERCEIVER_NORM_EPS if branch.branch_type == "uniperceiver" else NORM_EPS,
            layerscale_value=branch.layer_scale_init,
            hidden_act=branch.hidden_act,
        )
    elif branch.branch_type == "beit":
        base = BeitConfig(
            hidden_size=branch.hidden_size,
            num_hidden_layers=branch.num_hidden_layers,
            num_attention_heads=branch.num_attention_heads,
            intermediate_size=branch.intermediate_size,
            hidden_act=branch.hidden_act,
            layer_norm_eps=NORM_EPS,
            layer_scale_init_value=branch.layer_scale_init,
            use_relative_position_bias=False,  # the window's bias is the branch's (`WindowRelativePositionBias`)
            use_absolute_position_embeddings=False,
        )
    else:
        base = InternVLVisionConfig(
            hidden_size=branch.hidden_size,
            num_hidden_layers=branch.num_hidden_layers,
            num_attention_heads=branch.num_attention_heads,
            intermediate_size=branch.intermediate_size,
            attention_bias=branch.qkv_bias,
            use_qk_norm=branch.qk_norm,
            norm_type=branch.norm_type,
            layer_norm_eps=NORM_EPS,
            layer_scale_init_value=branch.layer_scale_init,
            hidden_act=branch.hidden_act,
        )
    base._attn_implementation = attn_implementation or "sdpa"
    configs = []
    for rate in linear_rates(branch.drop_path_rate, branch.num_hidden_layers):
        config = copy.copy(base)
        config.drop_path_rate = rate
        configs.append(config)
    return configs


# ----- windowed attention ------------------------------------------------------------------------
def window_partition(feature_map: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * windows, window * window, C), row-major windows."""
    batch, height, width, channels = feature_map.shape
    windows = feature_map.view(batch, height // window, window, width // window, window, channels)
    return windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_merge(windows: torch.Tensor, window: int, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * windows, window * window, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    feature_map = windows.view(batch, height // window, width // window, window, window, channels)
    return feature_map.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def pad_to_windows(feature_map: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map at the bottom and right to multiples of `window`."""
    height, width = feature_map.shape[1:3]
    pad_h = math.ceil(height / window) * window - height
    pad_w = math.ceil(width / window) * window - width
    return F.pad(feature_map, (0, 0, 0, pad_w, 0, pad_h))


def windowed_attention(
    attention: nn.Module,
    normed: torch.Tensor,
    grid: Grid,
    window: int,
    padding: str,
    attention_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention inside non-overlapping `window` x `window` windows of the token grid.

    `padding="tokens"` zero-pads the normed tokens before the q/k/v projections, so padded keys and
    values equal the projection biases and take part in the softmax (official flash path and
    InternViT); `"qkv"` zero-pads q, k and v after them (official DeiT non-flash path). The output
    projection acts per token, so it runs on the padded windows and the padding is cropped after.
    `attention_bias` (heads, window^2, window^2), BEiT's relative position bias, is added to every
    window's attention logits (padding tokens included, as the official BEiT does).
    """
    batch, _, channels = normed.shape
    height, width = grid
    if padding == "tokens":
        padded = pad_to_windows(normed.view(batch, height, width, channels), window)
        padded_height, padded_width = padded.shape[1:3]
        windows = window_partition(padded, window)
        if attention_bias is None:
            attended, _ = attention(windows)  # (B * windows, window^2, C)
        else:
            attended, _ = attention(windows, attention_mask=attention_bias[None].to(windows.dtype))
    else:
        attended = _attention_on_padded_qkv(attention, normed, grid, window)
        padded_height, padded_width = attended.shape[1:3]
        attended = window_partition(attended, window)
    merged = window_merge(attended, window, batch, padded_height, padded_width)
    return merged[:, :height, :width].reshape(batch, height * width, -1)


def _attention_on_padded_qkv(attention: nn.Module, normed: torch.Tensor, grid: Grid, window: int) -> torch.Tensor:
    """DeiT (`Dinov2Attention`) with zero-padded q/k/v; returns the projected (B, H', W', C) map."""
    batch, _, channels = normed.shape
    heads, head_dim = attention.num_attention_heads, attention.head_dim

    def windows_of(projection: nn.Linear) -> torch.Tensor:
        projected = pad_to_windows(projection(normed).view(batch, *grid, channels), window)
        # (B * windows, heads, window^2, head_dim)
        return window_partition(projected, window).unflatten(-1, (heads, head_dim)).transpose(1, 2)

    query, key, value = windows_of(attention.q_proj), windows_of(attention.k_proj), windows_of(attention.v_proj)
    padded_height = math.ceil(grid[0] / window) * window
    padded_width = math.ceil(grid[1] / window) * window
    attended = F.scaled_dot_product_attention(query, key, value, scale=attention.scaling)
    attended = attended.transpose(1, 2).flatten(2)  # (B * windows, window^2, C)
    return attention.o_proj(window_merge(attended, window, batch, padded_height, padded_width))


# ----- branches ------------------------------------------------------------------------------------
class WindowRelativePositionBias(nn.Module):
    """A BEiT layer's learned bias for each (query, key) offset inside its window (official `Attention.
    relative_position_bias_table`, without BEiT's class-token slots, indexed as BEiT indexes it)."""

    def __init__(self, window: int, num_heads: int):
        super().__init__()
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", self.offset_index(), persistent=False)

    def offset_index(self) -> torch.Tensor:
        """(window^2, window^2): the table row of each (query, key) pair of one window, row-major offsets
        (dy + window - 1) * (2 * window - 1) + (dx + window - 1). Built on the CPU: the model may be built on meta."""
        steps = torch.arange(self.window, device="cpu")
        coords = torch.stack(torch.meshgrid(steps, steps, indexing="ij")).flatten(1)  # (2, window^2)
        offsets = (coords[:, :, None] - coords[:, None, :]) + (self.window - 1)  # (2, window^2, window^2)
        return offsets[0] * (2 * self.window - 1) + offsets[1]

    def forward(self) -> torch.Tensor:
        """(heads, window^2, window^2)"""
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(self.window**2, self.window**2, -1).permute(2, 0, 1)


LAYER_CLASSES = {"deit": Dinov2Layer, "uniperceiver": Dinov2Layer, "internvit": InternVLVisionLayer, "beit": BeitLayer}


class PerceptionViTBranch(nn.Module):
    """A ViT branch: patch convolution, position table, optional class token, transformers layers."""

    def __init__(self, branch: PerceptionBranchConfig, config: PIIPPerceptionConfig):
        super().__init__()
        self.branch = branch
        self.resize_positions = config.resize_position_embeddings
        self.window_padding = "tokens" if branch.branch_type == "internvit" else branch.window_padding
        width = branch.hidden_size
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=branch.patch_size, stride=branch.patch_size)
        if branch.position_grid is None:
            self.position_embedding = None
        else:
            slots = branch.position_grid**2 + (1 if branch.position_class_slot else 0)
            self.position_embedding = nn.Parameter(torch.zeros(1, slots, width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if branch.use_cls_token else None
        if branch.branch_type == "uniperceiver":
            # Uni-Perceiver adds its first temporal position (one image is one frame), then a LayerNorm.
            self.temporal_position = nn.Parameter(torch.zeros(1, width))
            self.embedding_norm = nn.LayerNorm(width, eps=UNIPERCEIVER_NORM_EPS)
        else:
            self.temporal_position = self.embedding_norm = None
        layer_class = LAYER_CLASSES[branch.branch_type]
        configs = layer_configs(branch, config._attn_implementation)
        if layer_class is BeitLayer:
            self.layers = nn.ModuleList([BeitLayer(layer_config, layer_config.drop_path_rate) for layer_config in configs])
            self.relative_position_biases = nn.ModuleList(
                [WindowRelativePositionBias(window, branch.num_attention_heads) for window in branch.window_sizes]
            )
        else:
            self.layers = nn.ModuleList([layer_class(layer_config) for layer_config in configs])
            self.relative_position_biases = None

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    def position_embeddings(self, grid: Grid, index: int) -> torch.Tensor:
        """(H*W, C) positions for the token grid: the stored table, resized if the model resizes."""
        table = self.position_embedding[0, 1:] if self.branch.position_class_slot else self.position_embedding[0]
        stored = (self.branch.position_grid, self.branch.position_grid)
        if self.resize_positions:
            return interpolate_position_grid(table, grid)
        if tuple(grid) != stored:
            raise ValueError(
                f"Branch {index} gets a {grid[0]}x{grid[1]} token grid but adds its {stored[0]}x{stored[1]} position "
                f"table without resizing (as the official model does): give it a "
                f"{stored[0] * self.branch.patch_size}x{stored[1] * self.branch.patch_size} image."
            )
        return table

    def embed(self, image: torch.Tensor, index: int) -> BranchState:
        if min(image.shape[-2:]) < self.branch.patch_size:
            raise ValueError(
                f"Branch {index} gets a {image.shape[-2]}x{image.shape[-1]} image (resized from the input), smaller than "
                f"one {self.branch.patch_size}-pixel patch; use a larger image."
            )
        patches = self.patch_embedding(image.to(self.patch_embedding.weight.dtype))  # (batch, C, H, W)
        grid = tuple(patches.shape[-2:])
        tokens = patches.flatten(2).transpose(1, 2)
        if self.position_embedding is not None:
            tokens = tokens + self.position_embeddings(grid, index).to(patches.dtype)
        if self.embedding_norm is not None:
            tokens = self.embedding_norm(tokens + self.temporal_position.to(tokens.dtype))
        class_token = None if self.cls_token is None else self.cls_token.expand(tokens.shape[0], -1, -1)
        return BranchState(tokens=tokens, grid=grid, class_token=class_token)

    def run_blocks(self, state: BranchState, first: int, last: int) -> BranchState:
        has_class = state.class_token is not None
        hidden = torch.cat([state.class_token, state.tokens], dim=1) if has_class else state.tokens
        for index in range(first, last + 1):
            window = self.branch.window_sizes[index]
            if window is None:
                hidden = self.layers[index](hidden)
            else:
                hidden = self._windowed_layer(index, hidden, state.grid, window)
        if has_class:
            return BranchState(tokens=hidden[:, 1:], grid=state.grid, class_token=hidden[:, :1])
        return BranchState(tokens=hidden, grid=state.grid)

    def _windowed_layer(self, index: int, hidden: torch.Tensor, grid: Grid, window: int) -> torch.Tensor:
        """Layer `index`'s own computation with its attention restricted to windows (no class token)."""
        layer = self.layers[index]
        if isinstance(layer, Dinov2Layer):
            attended = windowed_attention(layer.attention, layer.norm1(hidden), grid, window, self.window_padding)
            hidden = hidden + layer.drop_path(layer.layer_scale1(attended))
            return hidden + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(hidden))))
        if isinstance(layer, BeitLayer):
            bias = self.relative_position_biases[index]()
            attended = windowed_attention(layer.attention, layer.layernorm_before(hidden), grid, window, "tokens", bias)
            hidden = hidden + layer.drop_path(layer.lambda_1 * attended)
            return hidden + layer.drop_path(layer.lambda_2 * layer.mlp(layer.layernorm_after(hidden)))
        attended = windowed_attention(layer.attention, layer.layernorm_before(hidden), grid, window, "tokens")
        hidden = hidden + layer.lambda_1 * attended
        return hidden + layer.lambda_2 * layer.dropout(layer.mlp(layer.layernorm_after(hidden)))


# ----- models ----------------------------------------------------------------------------------------
class PIIPPerceptionPreTrainedModel(PreTrainedModel):
    config: PIIPPerceptionConfig
    config_class = PIIPPerceptionConfig
    base_model_prefix = "piip"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Dinov2Layer", "InternVLVisionLayer", "BeitLayer", "ConvNextLayer", "BidirectionalInteractionUnit"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """As the official code: trunc-normal Linears, unit norms, He-normal convolutions, zero gates,
        reset deformable attention, merge weights 1; position tables trunc-normal, class tokens zero."""
        std = self.config.initializer_range
        if isinstance(module, Injector):
            init.zeros_(module.attn_gate)
            if module.with_cffn:
                init.zeros_(module.ffn_gate)
            if isinstance(module.attn, DeformableCrossAttention):
                init_deformable_attention(module.attn)
        elif isinstance(module, PerceptionViTBranch):
            if module.position_embedding is not None:
                init.trunc_normal_(module.position_embedding, std=std)
            if module.temporal_position is not None:
                init.trunc_normal_(module.temporal_position, std=std)
            if module.cls_token is not None:
                init.zeros_(module.cls_token)
        elif isinstance(module, Dinov2Layer):
            init.constant_(module.layer_scale1.lambda1, module.attention.config.layerscale_value)
            init.constant_(module.layer_scale2.lambda1, module.attention.config.layerscale_value)
        elif isinstance(module, (InternVLVisionLayer, BeitLayer)):
            init.constant_(module.lambda_1, module.attention.config.layer_scale_init_value)
            init.constant_(module.lambda_2, module.attention.config.layer_scale_init_value)
        elif isinstance(module, WindowRelativePositionBias):
            init.zeros_(module.relative_position_bias_table)  # as the official BEiT builds it
            init.copy_(module.relative_position_index, module.offset_index())  # a buffer, not saved
        elif isinstance(module, BranchMergeWeights):
            init.ones_(module.weights)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, InternVLVisionRMSNorm):
            init.ones_(module.weight)


@dataclass
class PIIPPerceptionModelOutput(PIIPVisionModelOutput):
    """
    Args:
        interaction_feature_maps (`tuple[tuple[torch.FloatTensor, ...], ...]`, *optional*): with
            `config.with_simple_fpn=False`, every branch's map right after each of the interactions
            `config.out_interaction_indexes`, one tuple (in branch order) per interaction.
    """

    interaction_feature_maps: tuple[tuple[torch.FloatTensor, ...], ...] | None = None


def build_perception_branch(branch: PerceptionBranchConfig, config: PIIPPerceptionConfig) -> nn.Module:
    """A ViT branch of the perception pyramid, or the LLaVA encoder's ConvNeXt branch adapter."""
    if branch.is_convolutional:
        return build_branch(branch.adapter_branch_config())
    return PerceptionViTBranch(branch, config)


class PIIPPerceptionModel(PIIPPerceptionPreTrainedModel):
    """The pyramid: every branch's final tokens as a map (and class token), after the last interaction."""

    def __init__(self, config: PIIPPerceptionConfig):
        super().__init__(config)
        branches = config.branch_configs
        # The branches' typed configs, read once: the architecture does not change after it is built.
        self.branch_configs = branches
        self.branches = nn.ModuleList([build_perception_branch(branch, config) for branch in branches])
        rates = linear_rates(config.interaction_drop_path_rate, config.num_interactions)
        self.interactions = nn.ModuleList(
            [
                # Each branch's width where the interaction runs (a ConvNeXt's changes by stage).
                PIIPInteraction(config, [branch.width_after_block(branch.interaction_groups[index][1]) for branch in branches], rate)
                for index, rate in enumerate(rates)
            ]
        )
        self.post_init()

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be a (batch, 3, height, width) tensor, got shape {tuple(pixel_values.shape)}."
            )
        if not self.config.resize_position_embeddings:
            size = self.config.image_size
            if tuple(pixel_values.shape[-2:]) != (size, size):
                raise ValueError(
                    f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but this model takes {size}x{size} "
                    f"images (its position tables are added without resizing); use its image processor."
                )

    def resize_for_branches(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Each branch's image, resized from the input with `scale_factor` as the official code does
        (bilinear, align_corners=False, floor of the output size); the input branch's is the input."""
        input_size = self.config.image_size
        images = []
        for branch in self.branch_configs:
            ratio = branch.image_size / input_size
            if ratio == 1:
                images.append(pixel_values)
            else:
                images.append(F.interpolate(pixel_values, scale_factor=ratio, mode="bilinear", align_corners=False))
        return images

    def embed(self, branch: nn.Module, image: torch.Tensor, index: int) -> BranchState:
        if isinstance(branch, ConvNextBranch):
            if min(image.shape[-2:]) < CONVNEXT_TOTAL_STRIDE:
                raise ValueError(
                    f"Branch {index} (ConvNeXt) gets a {image.shape[-2]}x{image.shape[-1]} image (resized from the input), "
                    f"smaller than its total stride {CONVNEXT_TOTAL_STRIDE}; use a larger image."
                )
            return branch.embed(image)
        return branch.embed(image, index)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs) -> PIIPPerceptionModelOutput:
        self.check_pixel_values(pixel_values)
        images = self.resize_for_branches(pixel_values)
        states = [self.embed(branch, image, index) for index, (branch, image) in enumerate(zip(self.branches, images), 1)]
        groups = [branch.interaction_groups for branch in self.branch_configs]
        merge_after = set() if self.config.with_simple_fpn else set(self.config.out_interaction_indexes)
        interaction_feature_maps = []
        for interaction_index, interaction in enumerate(self.interactions):
            states = [
                branch.run_blocks(state, *branch_groups[interaction_index])
                for branch, state, branch_groups in zip(self.branches, states, groups)
            ]
            states = interaction(states)
            if interaction_index in merge_after:
                interaction_feature_maps.append(tuple(state.feature_map() for state in states))
        output = PIIPPerceptionModelOutput(
            last_hidden_state=states[-1].tokens,  # (batch, H*W, C) of the last branch, as PIIPVisionModel
            feature_maps=tuple(state.feature_map() for state in states),
            class_tokens=tuple(None if state.class_token is None else state.class_token[:, 0] for state in states),
            interaction_feature_maps=tuple(interaction_feature_maps) if merge_after else None,
        )
        return output if return_dict is not False else output.to_tuple()


class BranchMergeWeights(nn.Module):
    """The scalar weight of each branch's map in the merged map (official `w1..wN`, initialised to 1)."""

    def __init__(self, num_branches: int):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(num_branches))

    def forward(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """Resize every map but the last to the last one's grid (fp32, bilinear), then the weighted sum."""
        target = feature_maps[-1].shape[-2:]
        merged = feature_maps[-1] * self.weights[-1]
        for weight, feature_map in zip(self.weights[:-1], feature_maps[:-1]):
            resized = F.interpolate(feature_map.float(), size=target, mode="bilinear", align_corners=False)
            merged = resized * weight + merged
        return merged


class ChannelLinearMerge(nn.Module):
    """Shared classification head's merge of a narrower branch: GroupNorm, Linear over channels, GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm_in = nn.GroupNorm(GROUP_NORM_GROUPS, in_channels)
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm_out = nn.GroupNorm(GROUP_NORM_GROUPS, out_channels)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        projected = self.proj(self.norm_in(feature_map).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.norm_out(projected)


class PIIPForImageClassification(PIIPPerceptionPreTrainedModel):
    """PIIP with the official classification heads (`config.classification_head`).

    `"separate"`: each branch's final norm and head read its *top-left patch token* (the official
    code splits the class token off before indexing `[:, 0]`), and the logits are averaged over
    branches. `"shared"`: each branch map is merged to branch 1's width (GroupNorm only for branch 1),
    resized to the last branch's grid, summed with weights, then LayerNorm per token, mean, head.
    """

    def __init__(self, config: PIIPPerceptionConfig):
        super().__init__(config)
        branches = config.branch_configs
        if any(branch.is_convolutional for branch in branches):
            raise ValueError("The official classifiers have ViT branches only; a convnext branch is for PIIPBackbone.")
        self.piip = PIIPPerceptionModel(config)
        widths = [branch.hidden_size for branch in branches]
        if config.classification_head == "separate":
            self.branch_norms = nn.ModuleList([branch_norm(branch) for branch in branches])
            self.branch_classifiers = nn.ModuleList([nn.Linear(width, config.num_labels) for width in widths])
        else:
            self.branch_merges = nn.ModuleList(
                [nn.GroupNorm(GROUP_NORM_GROUPS, widths[0])]
                + [ChannelLinearMerge(width, widths[0]) for width in widths[1:]]
            )
            self.merge_weights = BranchMergeWeights(len(branches))
            self.merged_norm = nn.LayerNorm(widths[0], eps=NORM_EPS)
            self.classifier = nn.Linear(widths[0], config.num_labels)
        self.post_init()

    def compute_logits(self, feature_maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.config.classification_head == "separate":
            logits = [
                classifier(norm(feature_map.flatten(2).transpose(1, 2))[:, 0])
                for feature_map, norm, classifier in zip(feature_maps, self.branch_norms, self.branch_classifiers)
            ]
            return torch.stack(logits).mean(dim=0)
        merged = self.merge_weights([merge(feature_map) for merge, feature_map in zip(self.branch_merges, feature_maps)])
        tokens = self.merged_norm(merged.flatten(2).transpose(1, 2))  # (batch, H_N * W_N, C_1)
        return self.classifier(tokens.mean(dim=1))

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, return_dict: bool | None = None, **kwargs
    ) -> ImageClassifierOutput:
        outputs = self.piip(pixel_values)
        logits = self.compute_logits(outputs.feature_maps)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        output = ImageClassifierOutput(loss=loss, logits=logits)
        return output if return_dict is not False else output.to_tuple()


class DenseBranchMerge(nn.Sequential):
    """Two (3x3 conv without bias, GroupNorm(32), ReLU) taking a branch map to branch 1's width."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(GROUP_NORM_GROUPS, out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(GROUP_NORM_GROUPS, out_channels),
            nn.ReLU(),
        )


class SingleConvBranchMerge(nn.Sequential):
    """`with_simple_fpn=False` merge of branches 2..N: one (3x3 conv without bias, GroupNorm(32), ReLU)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(GROUP_NORM_GROUPS, out_channels),
            nn.ReLU(),
        )


class NormOnlyBranchMerge(nn.Sequential):
    """`with_simple_fpn=False` merge of branch 1, already at the merged width: GroupNorm(32), ReLU."""

    def __init__(self, channels: int):
        super().__init__(nn.GroupNorm(GROUP_NORM_GROUPS, channels), nn.ReLU())


class IntermediateMerge(nn.Module):
    """The branches' maps after one interaction, merged at the last branch's grid (official
    `intermediate_merging_{k}_*`): branch 1 normed, the others convolved to branch 1's width, weighted sum."""

    def __init__(self, branch_widths: list[int]):
        super().__init__()
        width = branch_widths[0]
        self.branch_merges = nn.ModuleList(
            [NormOnlyBranchMerge(width)] + [SingleConvBranchMerge(branch_width, width) for branch_width in branch_widths[1:]]
        )
        self.merge_weights = BranchMergeWeights(len(branch_widths))

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.merge_weights([merge(feature_map) for merge, feature_map in zip(self.branch_merges, feature_maps)])


def build_upsample_4x(width: int) -> nn.Sequential:
    """ConvTranspose, GroupNorm, exact GELU, ConvTranspose: 4x the grid (official `fpn1`)."""
    return nn.Sequential(
        nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        nn.GroupNorm(GROUP_NORM_GROUPS, width),
        nn.GELU(),
        nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
    )


class PIIPBackbone(BackboneMixin, PIIPPerceptionPreTrainedModel):
    """The official dense-prediction backbone: merged maps at the last branch's grid, then four scales.

    With `with_simple_fpn` (every ViT config), one merged map and its scales: `fpn1` (4x up:
    ConvTranspose, GroupNorm, GELU, ConvTranspose), `fpn2` (2x up), `fpn3` (the merged map), `fpn4`
    (2x2 max pool, floor), all with branch 1's width. Without (the ConvNeXt configs), four merged maps:
    after each of the three `out_interaction_indexes` and after the last interaction; when the last
    branch is a ConvNeXt they are the outputs as they are (its grid shrinks stage by stage), otherwise
    the first is up-sampled 4x, the second 2x and the last max-pooled. `out_features` chooses which are
    returned (the DINO models take fpn2..fpn4).
    """

    has_attentions = False

    def __init__(self, config: PIIPPerceptionConfig):
        super().__init__(config)
        self.piip = PIIPPerceptionModel(config)
        branches = config.branch_configs
        widths = [branch.hidden_size for branch in branches]
        merge_widths = config.merge_widths()
        width = merge_widths[-1]
        # Official outputs as they are, without up- or down-sampling: a ConvNeXt last branch's maps.
        self.keeps_scales = not config.with_simple_fpn and config.last_branch_is_convolutional
        if config.with_simple_fpn:
            self.num_features = [width] * len(config.stage_names)
            self.branch_merges = nn.ModuleList([DenseBranchMerge(branch_width, width) for branch_width in widths])
            self.intermediate_merges = None
        else:
            self.num_features = merge_widths
            self.branch_merges = nn.ModuleList(
                [NormOnlyBranchMerge(width)] + [SingleConvBranchMerge(branch_width, width) for branch_width in widths[1:]]
            )
            self.intermediate_merges = nn.ModuleList(
                [
                    IntermediateMerge([branch.width_after_block(branch.interaction_groups[index][1]) for branch in branches])
                    for index in config.out_interaction_indexes
                ]
            )
        self.merge_weights = BranchMergeWeights(len(widths))
        scaled = not self.keeps_scales
        fpn2_width = width if config.with_simple_fpn else merge_widths[1]
        self.upsample_4x = build_upsample_4x(merge_widths[0]) if scaled and config.build_fpn1 else None
        self.upsample_2x = nn.ConvTranspose2d(fpn2_width, fpn2_width, kernel_size=2, stride=2) if scaled else None
        self.downsample_2x = nn.MaxPool2d(kernel_size=2, stride=2) if scaled else None
        self.post_init()

    def merged_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The map(s) the output scales are taken from: one, or four without `with_simple_fpn`."""
        outputs = self.piip(pixel_values)
        merged = self.merge_weights([merge(feature_map) for merge, feature_map in zip(self.branch_merges, outputs.feature_maps)])
        if self.intermediate_merges is None:
            return [merged]
        levels = [merge(maps) for merge, maps in zip(self.intermediate_merges, outputs.interaction_feature_maps)]
        return levels + [merged]

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs) -> BackboneOutput:
        maps = self.merged_maps(pixel_values)
        if self.keeps_scales:
            sources = dict(zip(STAGE_NAMES, maps))
            scales = {name: (lambda source=source: source) for name, source in sources.items()}
        else:
            sources = dict(zip(STAGE_NAMES, maps * 4 if len(maps) == 1 else maps))
            if min(sources["fpn4"].shape[-2:]) < 2:
                raise ValueError(
                    f"A {pixel_values.shape[-2]}x{pixel_values.shape[-1]} image gives a {tuple(sources['fpn4'].shape[-2:])} "
                    "merged map, too small for the 1/2 output; use an image of at least two patches per side."
                )
            scales = {
                "fpn1": (lambda: self.upsample_4x(sources["fpn1"])) if self.upsample_4x is not None else None,
                "fpn2": lambda: self.upsample_2x(sources["fpn2"]),
                "fpn3": lambda: sources["fpn3"],
                "fpn4": lambda: self.downsample_2x(sources["fpn4"]),
            }
        outputs = tuple(scales[name]().contiguous().float() for name in self.out_features)
        output = BackboneOutput(feature_maps=outputs)
        return output if return_dict is not False else output.to_tuple()


__all__ = [
    "PIIPBackbone",
    "PIIPForImageClassification",
    "PIIPPerceptionModel",
    "PIIPPerceptionModelOutput",
    "PIIPPerceptionPreTrainedModel",
    "PerceptionViTBranch",
]
