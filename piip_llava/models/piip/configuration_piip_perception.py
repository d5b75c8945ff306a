"""Configuration of PIIP for visual perception: ImageNet classifiers and detection / segmentation backbones.

The perception models of the PIIP paper are 2-, 3- or 4-branch pyramids of plain ViTs (DeiT /
DeiT III; AugReg, DINOv2, MAE and InternViT checkpoints through the InternViT-style block; BEiT;
Uni-Perceiver) and, in the ConvNeXt detection configs, ConvNeXt branches, joined by the same
interaction units as the LLaVA encoder. What differs from the LLaVA encoder is how each ViT
branch embeds its image (position tables resized per forward or added as stored, class tokens
without a class position), windowed attention, and the heads: classification heads or the merged
multi-scale maps a detector's neck takes. Facts and official line numbers are in
`PIIP_PERCEPTION_SPEC.md`; this file only holds the typed description.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from transformers import ConvNextConfig, PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

from .configuration_piip import PIIPBranchConfig

BRANCH_TYPES = ("deit", "internvit", "beit", "uniperceiver", "convnext")
NORM_TYPES = ("layer_norm", "rms_norm")
HIDDEN_ACTS = ("gelu", "gelu_pytorch_tanh")
CLASSIFICATION_HEADS = ("separate", "shared")
WINDOW_PADDINGS = ("tokens", "qkv")
STAGE_NAMES = ["fpn1", "fpn2", "fpn3", "fpn4"]  # 4x up, 2x up, 1x, 1/2 of the last branch's grid


@dataclass(kw_only=True)
class PerceptionBranchConfig:
    """One branch of a perception pyramid: a ViT, or a ConvNeXt.

    Attributes:
        branch_type: `"deit"` (DeiT / DeiT III block: LayerNorm, layer scale, exact GELU; transformers'
            `Dinov2Layer`), `"internvit"` (InternViT-style block: LayerNorm or RMSNorm, optional
            qk-norm across all heads, layer scale, exact or tanh GELU; transformers' `InternVLVisionLayer`),
            `"beit"` (BEiT / BEiT v2 block: q and v biases, no k bias, layer scale, a relative position
            bias per layer over its window; transformers' `BeitLayer`, every layer windowed, no
            absolute positions), `"uniperceiver"` (Uni-Perceiver's BERT-style block: the DeiT block with
            PyTorch's default LayerNorm eps 1e-5; its embedding adds the resized positions and the first
            temporal position, then a LayerNorm) or `"convnext"` (transformers' ConvNext, built by the
            LLaVA encoder's ConvNeXt branch adapter: its blocks are each stage's downsampling layer and
            ConvNeXt layers).
        convnext_config: for a `"convnext"` branch, its `ConvNextConfig` as a dict (`depths`,
            `hidden_sizes`, ...); `hidden_size` (the last stage's width) and `num_hidden_layers` (its
            block count) follow from it, and the ViT-only attributes below do not apply.
        image_size: the side of this branch's image when the model gets its configured input
            (official `img_size` / `real_size`).
        hidden_size / num_hidden_layers / num_attention_heads / mlp_ratio / qkv_bias: the ViT's shape.
        layer_scale_init: initial value of the per-channel layer scale (1.0 where the official block
            has none: the converter then stores ones, which computes the same function).
        norm_type / qk_norm / hidden_act: InternViT options (`deit` uses layer_norm, no qk-norm, gelu).
        patch_size: patch (and stride) of the patch embedding.
        position_grid: side of the stored position table's grid (class slot excluded); None for a
            branch without absolute positions (BEiT).
        position_class_slot: whether the stored table has a leading class position (never added).
        use_cls_token: keep a class token beside the patch tokens (it only acts through self-attention).
        window_sizes: per layer, the attention window side, or None for global attention.
        window_padding: how windowed attention pads grids that are not a multiple of the window:
            `"tokens"` zero-pads the normed tokens before the q/k/v projections (official flash-attention
            DeiT path, and every InternViT block), `"qkv"` zero-pads q, k, v after them (official DeiT
            non-flash path). InternViT branches always pad tokens.
        interaction_groups: inclusive `[first, last]` layer ranges, one per interaction.
    """

    image_size: int
    hidden_size: int | None = None  # a ConvNeXt's follows from its convnext_config
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    interaction_groups: list[list[int]]
    branch_type: str = "deit"
    convnext_config: dict | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_scale_init: float = 1.0
    norm_type: str = "layer_norm"
    qk_norm: bool = False
    hidden_act: str = "gelu"
    patch_size: int = 16
    position_grid: int | None = 14
    position_class_slot: bool = False
    use_cls_token: bool = False
    window_sizes: list[int | None] = field(default_factory=list)
    window_padding: str = "tokens"
    drop_path_rate: float = 0.0

    def __post_init__(self):
        if self.branch_type == "convnext" and self.convnext_config is not None:
            adapter_config = self.adapter_branch_config()
            self.hidden_size = adapter_config.final_geometry()[0]
            self.num_hidden_layers = adapter_config.num_blocks()
        if not self.window_sizes and self.num_hidden_layers is not None:
            self.window_sizes = [None] * self.num_hidden_layers
        self.interaction_groups = [list(group) for group in self.interaction_groups]

    @property
    def is_convolutional(self) -> bool:
        return self.branch_type == "convnext"

    def adapter_branch_config(self) -> PIIPBranchConfig:
        """A ConvNeXt branch as the LLaVA encoder's branch adapters take it (one way to build a ConvNeXt branch)."""
        return PIIPBranchConfig(
            backbone_config={"model_type": "convnext", **self.convnext_config},
            image_size=self.image_size,
            interaction_groups=self.interaction_groups,
        )

    def width_after_block(self, block_index: int) -> int:
        """The token width after `block_index` has run (ConvNeXt widths change by stage)."""
        if self.is_convolutional:
            return self.adapter_branch_config().geometry_after_block(block_index)[0]
        return self.hidden_size

    def stride_after_block(self, block_index: int) -> int:
        """Pixels per token after `block_index` has run (the official `downsample_ratios`)."""
        if self.is_convolutional:
            stage = self.adapter_branch_config().conv_block_stages()[block_index]
            return 4 * 2**stage
        return self.patch_size

    @property
    def intermediate_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.is_convolutional:
            # Everything a ConvNeXt branch is follows from its ConvNextConfig; the ViT attributes do not apply.
            return {key: data[key] for key in ("branch_type", "image_size", "convnext_config", "interaction_groups")}
        data.pop("convnext_config")
        return data

    @classmethod
    def from_dict(cls, data: dict, index: int) -> PerceptionBranchConfig:
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Branch {index}: unknown keys {unknown}; known keys: {sorted(known)}.")
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"Branch {index}: {error}") from error

    def validate(self, index: int) -> None:
        """Raise a ValueError naming the branch and the problem."""
        if self.branch_type not in BRANCH_TYPES:
            raise ValueError(f"Branch {index}: branch_type must be one of {BRANCH_TYPES}, got {self.branch_type!r}.")
        if self.is_convolutional:
            self._validate_convnext(index)
        else:
            self._validate_vit(index)
        self._validate_interaction_groups(index)

    def _validate_convnext(self, index: int) -> None:
        if self.convnext_config is None:
            raise ValueError(f"Branch {index}: a convnext branch needs its convnext_config (depths, hidden_sizes, ...).")
        config = ConvNextConfig(**self.convnext_config)
        if len(config.depths) != 4 or config.patch_size != 4:
            raise ValueError(
                f"Branch {index}: a convnext branch has four stages and a stride-4 stem, as the official "
                f"ConvNextHFWrapper expects; got depths {config.depths} and patch_size {config.patch_size}."
            )

    def _validate_vit(self, index: int) -> None:
        missing = [name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"Branch {index}: a {self.branch_type} branch needs {missing}.")
        checks = [
            (self.norm_type in NORM_TYPES, f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}"),
            (self.hidden_act in HIDDEN_ACTS, f"hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}"),
            (
                self.hidden_size % self.num_attention_heads == 0,
                f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads",
            ),
            (
                len(self.window_sizes) == self.num_hidden_layers,
                f"window_sizes has {len(self.window_sizes)} entries for {self.num_hidden_layers} layers",
            ),
            (
                self.branch_type not in ("deit", "uniperceiver") or (self.norm_type == "layer_norm" and not self.qk_norm),
                f"a {self.branch_type} branch has LayerNorm and no qk-norm",
            ),
            (
                not self.qk_norm or self.norm_type == "rms_norm",
                "qk-norm is supported with RMSNorm blocks only (as in every released InternViT config)",
            ),
            (
                self.branch_type not in ("deit", "uniperceiver") or float(self.mlp_ratio).is_integer(),
                f"a {self.branch_type} branch needs an integral mlp_ratio, got {self.mlp_ratio}",
            ),
            (
                self.branch_type != "uniperceiver" or (self.position_grid is not None and not self.position_class_slot),
                "a uniperceiver branch has a position table without class slot",
            ),
            (self.window_padding in WINDOW_PADDINGS, f"window_padding must be one of {WINDOW_PADDINGS}"),
            (
                self.branch_type != "beit" or all(size is not None for size in self.window_sizes),
                "a beit branch has windowed attention in every layer (its relative position bias spans one window)",
            ),
            (
                self.branch_type != "beit" or (self.norm_type == "layer_norm" and not self.qk_norm and self.qkv_bias),
                "a beit branch has LayerNorm, no qk-norm, and q / v biases",
            ),
            (
                self.position_grid is not None or self.branch_type == "beit",
                f"a {self.branch_type} branch needs its position_grid",
            ),
            (
                not self.use_cls_token or all(size is None for size in self.window_sizes),
                "windowed attention with a class token is not supported (the official dense models have none)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Branch {index}: {message}.")

    def _validate_interaction_groups(self, index: int) -> None:
        expected_first = 0
        for first, last in self.interaction_groups:
            if first != expected_first or last < first:
                raise ValueError(
                    f"Branch {index}: interaction groups {self.interaction_groups} must cover layers "
                    f"0..{self.num_hidden_layers - 1} in consecutive ranges."
                )
            expected_first = last + 1
        if expected_first != self.num_hidden_layers:
            raise ValueError(
                f"Branch {index}: interaction groups {self.interaction_groups} cover layers 0..{expected_first - 1} "
                f"of {self.num_hidden_layers}."
            )


class PIIPPerceptionConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of [`PIIPPerceptionModel`], [`PIIPForImageClassification`] and [`PIIPBackbone`].

    Args:
        branches (`list[dict]`): one [`PerceptionBranchConfig`] dict per branch, largest model /
            smallest image first. The default is a tiny 2-branch DeiT pyramid.
        input_branch (`int`, *optional*): 0-based index of the branch whose image the model receives
            (the others are resized from it with `scale_factor`); the last branch by default, the
            middle one for the official mmseg 3-branch models.
        resize_position_embeddings (`bool`): resize each stored position table bicubically to the
            branch's token grid at every forward (mmdet); otherwise the grid must equal the table's.
        classification_head (`str`): `"separate"` (each branch's norm + head on its top-left patch
            token, logits averaged) or `"shared"` (weighted merge of all maps, LayerNorm, mean, head).
        build_fpn1 (`bool`): whether the backbone has the 4x-upsampling output (the official DINO
            2- and 4-branch models do not build it).
        with_simple_fpn (`bool`): the four outputs are scales of the one merged map (True, every ViT
            config), or, as in the official ConvNeXt detection configs (False), the maps merged after
            the interactions `out_interaction_indexes` and after the last one: as they are when the
            last branch is a ConvNeXt (its stages give 1/4 .. 1/32), else the first two up-sampled 4x
            and 2x and the last max-pooled.
        out_interaction_indexes (`list[int]`): with `with_simple_fpn=False`, the three interactions
            (0-based, increasing) after which the branches are merged into the first three outputs.
        interaction_* / deform_* / with_cffn / cffn_ratio: the interaction units, as in `PIIPVisionConfig`.
        interaction_norm (`bool`): LayerNorms in the injectors (official `norm_layer='none'` = False).
        out_features / out_indices: which of `fpn1..fpn4` [`PIIPBackbone`] returns.
    """

    model_type = "piip_perception"

    branches: list | None = None
    input_branch: int | None = None
    resize_position_embeddings: bool = False
    classification_head: str = "separate"
    build_fpn1: bool = True
    with_simple_fpn: bool = True
    out_interaction_indexes: list[int] | None = None
    interaction_attention: str = "deform"
    deform_num_heads: int = 4
    deform_num_points: int = 4
    deform_ratio: float = 0.5
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    interaction_proj: bool = True
    interaction_norm: bool = True
    interaction_drop_path_rate: float = 0.0
    interaction_dropout: float = 0.0
    interaction_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.branches is None:
            self.branches = default_tiny_perception_branches()
        self.branches = [
            (branch if isinstance(branch, PerceptionBranchConfig) else PerceptionBranchConfig.from_dict(branch, index)).to_dict()
            for index, branch in enumerate(self.branches, start=1)
        ]
        self.stage_names = list(STAGE_NAMES)
        out_features = kwargs.pop("out_features", None)
        out_indices = kwargs.pop("out_indices", None)
        if out_features is None and out_indices is None:
            out_features = STAGE_NAMES if self.build_fpn1 else STAGE_NAMES[1:]
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        super().__post_init__(**kwargs)
        self.validate_layout()

    @property
    def branch_configs(self) -> list[PerceptionBranchConfig]:
        return [PerceptionBranchConfig(**branch) for branch in self.branches]

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def num_interactions(self) -> int:
        return len(self.branches[0]["interaction_groups"])

    @property
    def input_branch_index(self) -> int:
        return self.num_branches - 1 if self.input_branch is None else self.input_branch

    @property
    def image_size(self) -> int:
        """The side of the image the model takes as configured (the input branch's)."""
        return self.branches[self.input_branch_index]["image_size"]

    def validate_layout(self) -> None:
        if not 2 <= self.num_branches <= 4:
            raise ValueError(f"A PIIP perception model has 2 to 4 branches, got {self.num_branches}.")
        if not 0 <= self.input_branch_index < self.num_branches:
            raise ValueError(f"input_branch {self.input_branch} is not a branch index (0..{self.num_branches - 1}).")
        for name, value, allowed in (
            ("classification_head", self.classification_head, CLASSIFICATION_HEADS),
            ("interaction_attention", self.interaction_attention, ("deform", "normal")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        branches = self.branch_configs
        for index, branch in enumerate(branches, start=1):
            branch.validate(index)
        counts = [len(branch.interaction_groups) for branch in branches]
        if len(set(counts)) != 1:
            raise ValueError(f"Every branch needs the same number of interaction groups; got {counts}.")
        if "fpn1" in self.out_features and not self.build_fpn1:
            raise ValueError("out_features asks for fpn1 but build_fpn1 is false (the model has no 4x output).")
        self.validate_merges(branches)

    def validate_merges(self, branches: list[PerceptionBranchConfig]) -> None:
        if self.with_simple_fpn:
            if branches[-1].is_convolutional:
                raise ValueError(
                    "with_simple_fpn needs a ViT last branch (its merged map is up- and down-sampled); a ConvNeXt last "
                    "branch gives its scales through with_simple_fpn=False and out_interaction_indexes."
                )
            return
        indexes = self.out_interaction_indexes or []
        if len(indexes) != 3 or sorted(set(indexes)) != list(indexes) or not 0 <= indexes[0] <= indexes[-1] < self.num_interactions:
            raise ValueError(
                f"with_simple_fpn=False needs three increasing out_interaction_indexes among the {self.num_interactions} "
                f"interactions, got {self.out_interaction_indexes}."
            )
        if not self.build_fpn1:
            raise ValueError("with_simple_fpn=False returns four maps; build_fpn1 must be true.")
        widths = self.merge_widths()
        if any(width % 32 for width in widths):
            raise ValueError(
                f"The merged maps are branch 1's width where they are merged, {widths}, and are normed with GroupNorm(32): "
                "each must be a multiple of 32."
            )

    @property
    def last_branch_is_convolutional(self) -> bool:
        return self.branch_configs[-1].is_convolutional

    def merge_widths(self) -> list[int]:
        """Width of each merged map: branch 1's width where it is merged (after each out interaction, then at the end)."""
        first = self.branch_configs[0]
        if self.with_simple_fpn:
            return [first.hidden_size]
        return [
            first.width_after_block(first.interaction_groups[index][1]) for index in self.out_interaction_indexes
        ] + [first.hidden_size]


def default_tiny_perception_branches() -> list[dict]:
    """Two tiny DeiT branches: 64 wide at 32 px and 32 wide at 64 px, two layers each."""
    return [
        {"image_size": 32, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "position_grid": 2, "interaction_groups": [[0, 0], [1, 1]]},
        {"image_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 1,
         "position_grid": 4, "interaction_groups": [[0, 0], [1, 1]]},
    ]  # fmt: skip


__all__ = ["PIIPPerceptionConfig", "PerceptionBranchConfig"]
