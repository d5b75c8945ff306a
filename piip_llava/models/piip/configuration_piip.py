"""Configuration of the Parameter-Inverted Image Pyramid (PIIP) vision encoder.

A PIIP encoder is a list of branches (pretrained backbones seeing one image at different
resolutions, largest model / lowest resolution first) joined by interaction units between
consecutive groups of their blocks. Each branch is a :class:`PIIPBranchConfig` holding the real
transformers config of its network (CLIP vision, SigLIP vision, ConvNext or ResNet) as a
sub-config, so attention implementation and serialisation reach every branch. Every option is
checked here, once, when the config is built; the modules trust it.

Adding a branch type takes two entries: its family in `BRANCH_FAMILIES` below (which fixes how the
config computes the branch's blocks, widths and grids) and an adapter class registered for the
`model_type` in `branches.py` (`@register_branch_adapter("...")`).
"""


import copy
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Backbone model_type -> family. A "vit" branch has a patch embedding and `num_hidden_layers` blocks
# of constant width on one grid; a "convnext" or "resnet" branch has a stem of stride 4, then stages
# that each halve the grid, so its token grid and width change from stage to stage.
BranchFamily = Literal["vit", "convnext", "resnet"]
BRANCH_FAMILIES: dict[str, BranchFamily] = {
    "clip_vision_model": "vit",
    "siglip_vision_model": "vit",
    "convnext": "convnext",
    "resnet": "resnet",
}
# ViT families whose embeddings carry a class token.
CLASS_TOKEN_BACKBONE_TYPES = ("clip_vision_model",)
CONV_STEM_STRIDE = 4

# Keys transformers writes into every config dict that say nothing about the architecture; left out of
# the branch's saved `backbone_config` so config.json stays readable.
BACKBONE_NOISE_KEYS = frozenset(
    {
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "id2label",
        "label2id",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "chunk_size_feed_forward",
        "problem_type",
        "tie_word_embeddings",
        "is_encoder_decoder",
        "stage_names",
        "out_features",
        "out_indices",
    }
)


def backbone_config_dict(backbone_config: PreTrainedConfig, keys: list[str] | None = None) -> dict:
    """A backbone config as the branch stores it in JSON: its architecture keys and `model_type`.

    With `keys`, only those keys and the ones whose value differs from the backbone's defaults, so a
    config written by hand (or by the converter) keeps the keys it was given.
    """
    full = {
        key: value
        for key, value in backbone_config.to_dict().items()
        if not key.startswith("_") and key not in BACKBONE_NOISE_KEYS
    }
    if keys is None:
        return full
    defaults = type(backbone_config)().to_dict()
    return {key: value for key, value in full.items() if key in keys or key == "model_type" or value != defaults.get(key)}


def _backbone_config_from(value) -> PreTrainedConfig:
    """The backbone sub-config from a config object or its dict; refuses unsupported types by name."""
    if isinstance(value, PreTrainedConfig):
        model_type = value.model_type
    elif isinstance(value, dict):
        model_type = value.get("model_type")
    else:
        raise TypeError(f"A branch's backbone_config must be a config or a dict, got {type(value).__name__}.")
    if model_type not in BRANCH_FAMILIES:
        raise ValueError(
            f"Unsupported branch backbone model_type {model_type!r}; supported: {', '.join(BRANCH_FAMILIES)}."
        )
    if isinstance(value, PreTrainedConfig):
        return copy.deepcopy(value)
    options = {key: item for key, item in value.items() if key != "model_type" and not key.startswith("_")}
    return CONFIG_MAPPING[model_type](**options)


@strict
class PIIPBranchConfig(PreTrainedConfig):
    r"""
    One branch of a PIIP encoder.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`): the branch network (a CLIP or SigLIP vision config,
            a ConvNext or ResNet config); a dict needs its `model_type`.
        image_size (`int`): the square resolution this branch sees.
        interaction_groups (`list[list[int]]`, *optional*): inclusive `[first, last]` block ranges, one per
            interaction, covering every block; by default one group of all blocks.
        patch_size (`int`, *optional*): ViT branches: the patch kernel used here (a pretrained kernel of another
            size is resampled once when loading); the backbone's by default.
        patch_stride (`int`, *optional*): ViT branches: the stride of the patch convolution, `patch_size` by
            default. Only checkpoints written by the official code with a resampled kernel differ (see
            docs/conversion.md): they ran a 16x16 kernel at the pretrained stride 14.
        pretrain_grid_size (`int`, *optional*): ViT branches: side of the stored position-embedding grid
            (class position excluded); interpolated at run time to the branch's token grid.
        use_cls_token (`bool`, *optional*): ViT branches with a class token: keep it beside the patch tokens
            (default true for CLIP; SigLIP has none).
    """

    model_type = "piip_branch"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=PreTrainedConfig, model_type="clip_vision_model"),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    image_size: int = 224
    interaction_groups: list[list[int]] | None = None
    patch_size: int | None = None
    patch_stride: int | None = None
    pretrain_grid_size: int | None = None
    use_cls_token: bool | None = None

    def __post_init__(self, **kwargs):
        backbone = {"model_type": "clip_vision_model"} if self.backbone_config is None else self.backbone_config
        # The keys a dict stated, written back as given (see `to_dict`).
        self._backbone_keys = sorted(backbone) if isinstance(backbone, dict) else None
        self.backbone_config = _backbone_config_from(backbone)
        if self.family == "vit":
            self._fill_vit_defaults()
        else:
            for name in ("patch_size", "patch_stride", "pretrain_grid_size", "use_cls_token"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to ViT branches only, not to a {self.backbone_type} branch.")
        if self.interaction_groups is None:
            self.interaction_groups = [[0, self.num_blocks() - 1]]
        self.interaction_groups = [list(group) for group in self.interaction_groups]
        super().__post_init__(**kwargs)

    def _fill_vit_defaults(self) -> None:
        backbone = self.backbone_config
        if self.patch_size is None:
            self.patch_size = backbone.patch_size
        if self.patch_stride is None:
            self.patch_stride = self.patch_size
        if self.pretrain_grid_size is None:
            self.pretrain_grid_size = backbone.image_size // backbone.patch_size
        has_class_token = self.backbone_type in CLASS_TOKEN_BACKBONE_TYPES
        if self.use_cls_token is None:
            self.use_cls_token = has_class_token
        elif self.use_cls_token and not has_class_token:
            raise ValueError(
                f"A {self.backbone_type} branch has no class token: set use_cls_token to false for it."
            )

    def to_dict(self) -> dict:
        """The branch as stored in config.json (the layout every released and converted config uses)."""
        data = {
            "backbone_config": backbone_config_dict(self.backbone_config, self._backbone_keys),
            "image_size": self.image_size,
            "interaction_groups": [list(group) for group in self.interaction_groups],
        }
        if self.family == "vit":
            data.update(
                patch_size=self.patch_size,
                pretrain_grid_size=self.pretrain_grid_size,
                use_cls_token=self.use_cls_token,
            )
            if self.patch_stride != self.patch_size:
                data["patch_stride"] = self.patch_stride
        return data

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    # ----- static geometry, used to size interaction units and projectors and to validate configs -----
    @property
    def backbone_type(self) -> str:
        return self.backbone_config.model_type

    @property
    def family(self) -> BranchFamily:
        return BRANCH_FAMILIES[self.backbone_type]

    @property
    def is_convolutional(self) -> bool:
        """A branch whose grid and width change by stage (ConvNeXt, ResNet), as opposed to a ViT."""
        return self.family != "vit"

    def num_blocks(self) -> int:
        if self.is_convolutional:
            return len(self.conv_block_stages())
        return self.backbone_config.num_hidden_layers

    def conv_block_stages(self) -> list[int]:
        """Stage index of each block of a convolutional branch.

        ConvNeXt's downsampling layers (stages 2-4) count as blocks of their own; a ResNet stage
        downsamples inside its first layer, so its blocks are just its layers.
        """
        separate_downsampling = self.family == "convnext"
        stages = []
        for stage, depth in enumerate(self.backbone_config.depths):
            stages.extend([stage] * (depth + (1 if separate_downsampling and stage > 0 else 0)))
        return stages

    def vit_grid_side(self) -> int:
        """Tokens per side of a ViT branch: floor((S - kernel) / stride) + 1, as the patch convolution yields."""
        return (self.image_size - self.patch_size) // self.patch_stride + 1

    def geometry_after_block(self, block_index: int) -> tuple[int, int]:
        """(width, grid side) of the branch's tokens after `block_index` has run."""
        if self.is_convolutional:
            stage = self.conv_block_stages()[block_index]
            return self.backbone_config.hidden_sizes[stage], self.image_size // (CONV_STEM_STRIDE * 2**stage)
        return self.backbone_config.hidden_size, self.vit_grid_side()

    def final_geometry(self) -> tuple[int, int]:
        return self.geometry_after_block(self.num_blocks() - 1)

    def check(self, index: int) -> None:
        """Raise a ValueError naming branch `index` (1-based) when it cannot be part of a PIIP encoder."""
        if self.family == "resnet" and self.backbone_config.downsample_in_first_stage:
            raise ValueError(
                f"Branch {index}: a ResNet branch needs downsample_in_first_stage false: PIIP expects a stem of "
                "stride 4 and a first stage that keeps its grid."
            )
        self._check_interaction_groups(index)
        if self.is_convolutional:
            stride = CONV_STEM_STRIDE * 2 ** (len(self.backbone_config.depths) - 1)
            if self.image_size % stride:
                raise ValueError(
                    f"Branch {index}: image size {self.image_size} cannot be tiled by the {self.backbone_type} "
                    f"backbone's total stride {stride}; use a multiple of {stride}."
                )
            return
        if self.patch_stride == self.patch_size and self.image_size % self.patch_size:
            raise ValueError(
                f"Branch {index}: image size {self.image_size} is not a multiple of the patch size {self.patch_size}."
            )
        if self.image_size < self.patch_size:
            raise ValueError(f"Branch {index}: image size {self.image_size} is smaller than its patch {self.patch_size}.")
        # The backbone's own config checks its heads against its width when it is built.

    def _check_interaction_groups(self, index: int) -> None:
        num_blocks = self.num_blocks()
        expected_first = 0
        for group in self.interaction_groups:
            if len(group) != 2:
                raise ValueError(f"Branch {index}: interaction group {group} must be [first_block, last_block].")
            first, last = group
            if first != expected_first or last < first:
                raise ValueError(
                    f"Branch {index}: interaction groups {self.interaction_groups} must cover blocks 0..{num_blocks - 1} "
                    f"in consecutive, non-overlapping ranges (group {group} should start at block {expected_first})."
                )
            expected_first = last + 1
        if expected_first != num_blocks:
            raise ValueError(
                f"Branch {index}: interaction groups {self.interaction_groups} cover blocks 0..{expected_first - 1} but "
                f"the {self.backbone_type} backbone has {num_blocks} blocks (0..{num_blocks - 1})."
            )


@strict
class PIIPVisionConfig(PreTrainedConfig):
    r"""
    Configuration of [`PIIPVisionModel`].

    Args:
        branches (`list[PIIPBranchConfig | dict]`):
            One branch per entry, ordered large model / low resolution first; dicts take the keys of
            [`PIIPBranchConfig`]. The default is a tiny two-branch CLIP pyramid that builds quickly.
        interaction_attention (`str`, defaults to `"deform"`):
            `"deform"` (single-level deformable attention) or `"normal"` (multi-head cross attention).
        deform_num_heads (`int`): heads of the interaction attention.
        deform_num_points (`int`): sampling points per head (deformable attention).
        deform_ratio (`float`): width of the deformable attention's values relative to the query.
        with_cffn (`bool`): whether each injector has a ConvFFN after the attention.
        cffn_ratio (`float`): hidden width of the ConvFFN relative to its input.
        interaction_proj (`bool`): project each branch's tokens to its partner's width before injecting.
        interaction_drop_path_rate (`float`): drop path on the ConvFFN residual (training only).
        interaction_dropout (`float`): dropout inside the ConvFFN.
        interaction_norm_eps (`float`): epsilon of the interaction LayerNorms.
        initializer_range (`float`): std of the truncated normal init of interaction Linears.

    `image_size` (the resolution the encoder receives) and `hidden_size` (the width of the last branch's
    final tokens) are derived from the branches; a config.json that states `image_size` must agree.
    """

    model_type = "piip_vision"

    branches: list[PIIPBranchConfig | dict] | None = None
    interaction_attention: Literal["deform", "normal"] = "deform"
    deform_num_heads: int = 16
    deform_num_points: int = 4
    deform_ratio: float = 0.5
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    interaction_proj: bool = True
    interaction_drop_path_rate: float = 0.0
    interaction_dropout: float = 0.0
    interaction_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.branches is None:
            self.branches = default_tiny_branches()
        self.branches = [
            copy.deepcopy(branch) if isinstance(branch, PIIPBranchConfig) else PIIPBranchConfig(**branch)
            for branch in self.branches
        ]
        super().__post_init__(**kwargs)
        self.check_layout()

    @property
    def _attn_implementation(self):
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None):
        """Set on this config and, when one is named, on every branch's backbone config."""
        PreTrainedConfig._attn_implementation.fset(self, value)
        implementation = value.get("branches") if isinstance(value, dict) else value
        if implementation is not None:
            for branch in self.branches:
                branch._attn_implementation = implementation

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["branches"] = [branch.to_dict() for branch in self.branches]
        return output

    # ----------------------------------------------------------------------------------------
    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def num_interactions(self) -> int:
        return len(self.branches[0].interaction_groups)

    @property
    def image_size(self) -> int:
        """The resolution the encoder receives: that of the highest-resolution branch."""
        return max(branch.image_size for branch in self.branches)

    @image_size.setter
    def image_size(self, value: int) -> None:
        if value != self.image_size:
            sizes = [branch.image_size for branch in self.branches]
            raise ValueError(
                f"image_size {value} disagrees with the branches' resolutions {sizes}: the encoder's image size is the "
                "largest of them; change a branch's image_size instead."
            )

    @property
    def hidden_size(self) -> int:
        """Width of the last (highest-resolution) branch's final tokens."""
        return self.branches[-1].final_geometry()[0]

    @property
    def output_grid_size(self) -> int:
        """Side of the last branch's final token grid, which sets the number of image tokens."""
        return self.branches[-1].final_geometry()[1]

    @property
    def branch_output_widths(self) -> list[int]:
        return [branch.final_geometry()[0] for branch in self.branches]

    def check_layout(self) -> None:
        """Raise a ValueError naming the problem when the branches and interactions cannot form a PIIP encoder."""
        if not 1 <= len(self.branches) <= 4:
            raise ValueError(f"A PIIP encoder has 1 to 4 branches, got {len(self.branches)}.")
        counts = [len(branch.interaction_groups) for branch in self.branches]
        if len(set(counts)) != 1:
            raise ValueError(
                f"Every branch needs the same number of interaction groups; got {counts} for branches 1..{len(counts)}."
            )
        for index, branch in enumerate(self.branches, start=1):
            branch.check(index)
        self._check_interaction_widths()

    def _check_interaction_widths(self) -> None:
        """Every interaction attention splits its width evenly into heads: the query's (plain attention) or the
        values' (deformable attention, `deform_ratio` of the query's)."""
        if self.num_branches < 2:
            return
        heads = self.deform_num_heads
        for interaction in range(self.num_interactions):
            for index, branch in enumerate(self.branches, start=1):
                width = branch.geometry_after_block(branch.interaction_groups[interaction][1])[0]
                if self.interaction_attention == "deform":
                    name, split_width = f"deformable value width ({width} x deform_ratio {self.deform_ratio})", int(
                        width * self.deform_ratio
                    )
                else:
                    name, split_width = "query width", width
                if split_width % heads:
                    raise ValueError(
                        f"Branch {index}, interaction {interaction + 1}: the {name} {split_width} is not divisible by "
                        f"deform_num_heads {heads}."
                    )


def default_tiny_branches() -> list[dict]:
    """Two tiny CLIP branches: a wider one at 64 px and a narrow one at 128 px."""
    return [
        {
            "backbone_config": {
                "model_type": "clip_vision_model",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "image_size": 64,
                "patch_size": 16,
            },
            "image_size": 64,
            "interaction_groups": [[0, 1], [2, 3]],
        },
        {
            "backbone_config": {
                "model_type": "clip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 64,
                "patch_size": 16,
            },
            "image_size": 128,
            "interaction_groups": [[0, 0], [1, 1]],
        },
    ]


__all__ = ["PIIPBranchConfig", "PIIPVisionConfig"]
