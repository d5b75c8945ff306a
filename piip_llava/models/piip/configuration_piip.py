"""Configuration of the Parameter-Inverted Image Pyramid (PIIP) vision encoder.

A PIIP encoder is a list of branches (pretrained backbones seeing one image at different
resolutions, largest model / lowest resolution first) joined by interaction units between
consecutive groups of their blocks. Each branch is described by a :class:`BranchSpec`; the
branch's network itself is a standard transformers backbone config (CLIP vision, SigLIP vision,
DINOv2, ConvNext or ResNet), stored as a plain dict so the whole config stays JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig, PreTrainedConfig

VIT_BACKBONE_TYPES = ("clip_vision_model", "siglip_vision_model", "dinov2")
CONVNEXT_BACKBONE_TYPES = ("convnext",)
RESNET_BACKBONE_TYPES = ("resnet",)
# Convolutional branches: a stem of stride 4, then stages that each halve the grid, so their
# token grid and width change from stage to stage.
CONV_BACKBONE_TYPES = CONVNEXT_BACKBONE_TYPES + RESNET_BACKBONE_TYPES
INTERACTION_ATTENTION_TYPES = ("deform", "normal")
CONV_STEM_STRIDE = 4


@dataclass
class BranchSpec:
    """One branch of the pyramid, as the model needs it.

    Attributes:
        backbone_config: the transformers config dict of the branch network (with `model_type`).
        image_size: the square resolution this branch sees.
        interaction_groups: inclusive `[first, last]` block ranges, one per interaction.
        patch_size: ViT branches: the patch size used here (a pretrained kernel of another size is
            resampled once when loading).
        pretrain_grid_size: ViT branches: side of the stored position-embedding grid (class
            position excluded); it is interpolated to this branch's own token grid.
        use_cls_token: ViT branches with a class token: keep it beside the patch tokens.
    """

    backbone_config: dict
    image_size: int
    interaction_groups: list[list[int]]
    patch_size: int | None = None
    pretrain_grid_size: int | None = None
    use_cls_token: bool = True

    @property
    def backbone_type(self) -> str:
        return self.backbone_config["model_type"]

    @property
    def is_convnext(self) -> bool:
        return self.backbone_type in CONVNEXT_BACKBONE_TYPES

    @property
    def is_resnet(self) -> bool:
        return self.backbone_type in RESNET_BACKBONE_TYPES

    @property
    def is_convolutional(self) -> bool:
        """A branch whose grid and width change by stage (ConvNeXt, ResNet), as opposed to a ViT."""
        return self.backbone_type in CONV_BACKBONE_TYPES

    def to_dict(self) -> dict:
        data = {
            "backbone_config": self.backbone_config,
            "image_size": self.image_size,
            "interaction_groups": [list(group) for group in self.interaction_groups],
        }
        if not self.is_convolutional:
            data.update(
                patch_size=self.patch_size,
                pretrain_grid_size=self.pretrain_grid_size,
                use_cls_token=self.use_cls_token,
            )
        return data

    def build_backbone_config(self) -> PreTrainedConfig:
        """The transformers config of the branch network, adjusted to this branch's patch size and
        pretrained position grid (so the embedding tables have the stored shapes)."""
        options = {key: value for key, value in self.backbone_config.items() if key != "model_type"}
        if not self.is_convolutional:
            options["patch_size"] = self.patch_size
            options["image_size"] = self.pretrain_grid_size * self.patch_size
        return AutoConfig.for_model(self.backbone_type, **options)

    # ----- static geometry, used to size interaction units and to validate configs -----
    def num_blocks(self) -> int:
        if self.is_convolutional:
            return len(self.conv_block_stages())
        return self.backbone_config.get("num_hidden_layers", 12)

    def conv_block_stages(self) -> list[int]:
        """Stage index of each block of a convolutional branch.

        ConvNeXt's downsampling layers (stages 2-4) count as blocks of their own; a ResNet stage
        downsamples inside its first layer, so its blocks are just its layers.
        """
        depths = self.build_backbone_config().depths
        separate_downsampling = self.is_convnext
        stages = []
        for stage, depth in enumerate(depths):
            stages.extend([stage] * (depth + (1 if separate_downsampling and stage > 0 else 0)))
        return stages

    def geometry_after_block(self, block_index: int) -> tuple[int, int]:
        """(width, grid side) of the branch's tokens after `block_index` has run."""
        if self.is_convolutional:
            stage = self.conv_block_stages()[block_index]
            hidden_sizes = self.build_backbone_config().hidden_sizes
            return hidden_sizes[stage], self.image_size // (CONV_STEM_STRIDE * 2**stage)
        return self.backbone_config.get("hidden_size", 768), self.image_size // self.patch_size

    def final_geometry(self) -> tuple[int, int]:
        return self.geometry_after_block(self.num_blocks() - 1)


class PIIPVisionConfig(PreTrainedConfig):
    r"""
    Configuration of [`PIIPVisionModel`].

    Args:
        branches (`list[dict]`):
            One dict per branch, ordered large model / low resolution first; keys as in
            [`BranchSpec`]. The default is a tiny two-branch CLIP pyramid that builds quickly.
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
    """

    model_type = "piip_vision"

    branches: list | None = None
    interaction_attention: str = "deform"
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
        self.branches = [_normalise_branch(branch) for branch in self.branches]
        super().__post_init__(**kwargs)
        self.validate_layout()

    # ----------------------------------------------------------------------------------------
    @property
    def branch_specs(self) -> list[BranchSpec]:
        return [
            BranchSpec(
                backbone_config=branch["backbone_config"],
                image_size=branch["image_size"],
                interaction_groups=branch["interaction_groups"],
                patch_size=branch.get("patch_size"),
                pretrain_grid_size=branch.get("pretrain_grid_size"),
                use_cls_token=branch.get("use_cls_token", True),
            )
            for branch in self.branches
        ]

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def num_interactions(self) -> int:
        return len(self.branches[0]["interaction_groups"])

    @property
    def image_size(self) -> int:
        """The resolution the encoder receives: that of the highest-resolution (last) branch."""
        return max(branch["image_size"] for branch in self.branches)

    @property
    def output_grid_size(self) -> int:
        """Side of the last branch's final token grid, which sets the number of image tokens."""
        return self.branch_specs[-1].final_geometry()[1]

    @property
    def branch_output_widths(self) -> list[int]:
        return [spec.final_geometry()[0] for spec in self.branch_specs]

    def validate_layout(self) -> None:
        """Raise a ValueError naming the problem when the branches cannot form a PIIP encoder."""
        if not 1 <= len(self.branches) <= 4:
            raise ValueError(f"A PIIP encoder has 1 to 4 branches, got {len(self.branches)}.")
        if self.interaction_attention not in INTERACTION_ATTENTION_TYPES:
            raise ValueError(
                f"interaction_attention must be one of {INTERACTION_ATTENTION_TYPES}, got {self.interaction_attention!r}."
            )
        group_counts = {len(branch["interaction_groups"]) for branch in self.branches}
        if len(group_counts) != 1:
            counts = [len(branch["interaction_groups"]) for branch in self.branches]
            raise ValueError(
                f"Every branch needs the same number of interaction groups; got {counts} for branches 1..{len(counts)}."
            )
        for index, spec in enumerate(self.branch_specs, start=1):
            _validate_branch(index, spec)


def _normalise_branch(branch) -> dict:
    """Accept a dict (or BranchSpec) and fill the derived defaults, so saved configs are explicit."""
    if isinstance(branch, BranchSpec):
        branch = branch.to_dict()
    if not isinstance(branch, dict):
        raise TypeError(f"Each branch must be a dict, got {type(branch).__name__}.")
    for key in ("backbone_config", "image_size", "interaction_groups"):
        if key not in branch:
            raise ValueError(f"Branch config {branch!r} lacks the required key {key!r}.")
    branch = dict(branch)
    backbone = branch["backbone_config"]
    if isinstance(backbone, PreTrainedConfig):
        backbone = backbone.to_dict()
    backbone = {k: v for k, v in backbone.items() if not k.startswith("_") and k not in _BACKBONE_NOISE_KEYS}
    model_type = backbone.get("model_type")
    if model_type not in VIT_BACKBONE_TYPES + CONV_BACKBONE_TYPES:
        raise ValueError(
            f"Unsupported branch backbone model_type {model_type!r}; supported: "
            f"{', '.join(VIT_BACKBONE_TYPES + CONV_BACKBONE_TYPES)}."
        )
    if model_type in RESNET_BACKBONE_TYPES and backbone.get("downsample_in_first_stage", False):
        raise ValueError(
            "A ResNet branch needs downsample_in_first_stage false: PIIP expects a stem of stride 4 and a "
            "first stage that keeps its grid."
        )
    branch["backbone_config"] = backbone
    branch["interaction_groups"] = [list(group) for group in branch["interaction_groups"]]
    if model_type not in CONV_BACKBONE_TYPES:
        patch_size = branch.get("patch_size") or backbone.get("patch_size", 16)
        branch["patch_size"] = patch_size
        if branch.get("pretrain_grid_size") is None:
            branch["pretrain_grid_size"] = backbone.get("image_size", 224) // backbone.get("patch_size", 16)
        branch.setdefault("use_cls_token", model_type != "siglip_vision_model")
        if model_type == "siglip_vision_model" and branch["use_cls_token"]:
            raise ValueError("SigLIP has no class token: set use_cls_token to false for a SigLIP branch.")
    return branch


# Keys transformers writes into every config dict that say nothing about the architecture.
_BACKBONE_NOISE_KEYS = {
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


def _validate_branch(index: int, spec: BranchSpec) -> None:
    num_blocks = spec.num_blocks()
    expected_first = 0
    for group in spec.interaction_groups:
        if len(group) != 2:
            raise ValueError(f"Branch {index}: interaction group {group} must be [first_block, last_block].")
        first, last = group
        if first != expected_first or last < first:
            raise ValueError(
                f"Branch {index}: interaction groups {spec.interaction_groups} must cover blocks 0..{num_blocks - 1} "
                f"in consecutive, non-overlapping ranges (group {group} should start at block {expected_first})."
            )
        expected_first = last + 1
    if expected_first != num_blocks:
        raise ValueError(
            f"Branch {index}: interaction groups {spec.interaction_groups} cover blocks 0..{expected_first - 1} but the "
            f"{spec.backbone_type} backbone has {num_blocks} blocks (0..{num_blocks - 1})."
        )
    if spec.is_convolutional:
        stride = CONV_STEM_STRIDE * 2 ** (len(spec.build_backbone_config().depths) - 1)
        if spec.image_size % stride:
            raise ValueError(
                f"Branch {index}: image size {spec.image_size} cannot be tiled by the {spec.backbone_type} backbone's "
                f"total stride {stride}; use a multiple of {stride}."
            )
    elif spec.image_size % spec.patch_size:
        raise ValueError(
            f"Branch {index}: image size {spec.image_size} is not a multiple of the patch size {spec.patch_size}."
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


__all__ = ["BranchSpec", "PIIPVisionConfig"]
