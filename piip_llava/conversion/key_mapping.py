"""Official PIIP-LLaVA parameter names -> ours, one rule per part of the model.

`map_released_key(name, projector_norm)` returns our name, `EXPECTED_UNUSED` for tensors the
converted model does not need (CLIP's post-LayerNorm, timm's classifier head, position-id buffers,
LLaMA's stored rotary frequencies), or None for a name no rule knows (reported as unused).

| official                                                         | ours                                                     |
|------------------------------------------------------------------|----------------------------------------------------------|
| `model.embed_tokens`, `model.layers.*`, `model.norm`             | `model.language_model.` + the same                       |
| `lm_head.weight`                                                 | `lm_head.weight`                                         |
| `...vision_tower.vision_tower.branchN.clip_model.embeddings.*`   | `model.vision_tower.branches.{N-1}.embeddings.*`         |
| `... .clip_model.pre_layrnorm.*`                                 | `... .pre_layernorm.*`                                   |
| `... .clip_model.encoder.layers.L.*`                             | `... .layers.L.*`                                        |
| `...branchN.convnext_model.stem.{0,1}`                           | `...branches.{N-1}.embeddings.{patch_embeddings,layernorm}` |
| `... .stages.S.downsample.{0,1}`                                 | `... .stages.S.downsampling_layer.{0,1}`                 |
| `... .stages.S.blocks.J.{conv_dw,norm,mlp.fc1,mlp.fc2}`          | `... .stages.S.layers.J.{dwconv,layernorm,pwconv1,pwconv2}` |
| `... .stages.S.blocks.J.{weight,gamma}` (layer scale)            | `... .stages.S.layers.J.layer_scale_parameter`           |
| `...interactions.K.interaction_units_PQ.branch1to2_proj`         | `model.vision_tower.interactions.K.units.{P-1}.proj_a_to_b` |
| `... .branch2to1_proj` / `.branch2to1_injector` / `.branch1to2_injector` | `.proj_b_to_a` / `.injector_into_a` / `.injector_into_b` |
| injector `ca_weight` / `cffn_weight`                             | `attn_gate` / `ffn_gate` (other names unchanged)         |
| `model.mm_projector.branchN.{1,3,6}` (GroupNorm variant)         | `model.multi_modal_projector.branches.{N-1}.{linear_1,norm,linear_2}` |
| `model.mm_projector.branchN.{1,5}` (LayerNorm variant)           | `... .{linear_1,linear_2}`; its LayerNorm has no parameters |

The official projector is an `nn.Sequential`: GroupNorm variant = Permute, Linear (1), Permute,
GroupNorm (3), GELU, Permute, Linear (6), Permute; LayerNorm variant = Permute, Linear (1),
a parameter-free LayerNorm over channels (2), GELU, Permute, Linear (5), Permute. Our LayerNorm
projector has an affine LayerNorm, so the converter writes weight 1 and bias 0 for it
(`PARAMETER_FREE_NORM_FILL`), which computes the same function.
"""

from __future__ import annotations

import re

EXPECTED_UNUSED = "expected-unused"

VISION_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."

PROJECTOR_INDEXES = {
    "group_norm": {"1": "linear_1", "3": "norm", "6": "linear_2"},
    "layer_norm": {"1": "linear_1", "5": "linear_2"},
}
# Our names for parameters the official LayerNorm projector does not have, and their values.
PARAMETER_FREE_NORM_FILL = {"norm.weight": 1.0, "norm.bias": 0.0}

INTERACTION_RENAMES = (
    ("branch1to2_proj.", "proj_a_to_b."),
    ("branch2to1_proj.", "proj_b_to_a."),
    ("branch2to1_injector.", "injector_into_a."),
    ("branch1to2_injector.", "injector_into_b."),
)
INJECTOR_GATES = {"ca_weight": "attn_gate", "cffn_weight": "ffn_gate"}
INJECTOR_PARTS = re.compile(
    r"(query_norm|feat_norm|ffn_norm)\.(weight|bias)$"
    r"|attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)$"
    r"|attn\.(wq|wk|wv)\.weight$|attn\.proj\.(weight|bias)$"
    r"|ffn\.(fc1|fc2|dwconv\.dwconv)\.(weight|bias)$"
)

CONVNEXT_BLOCK_PARTS = {
    "conv_dw": "dwconv",
    "norm": "layernorm",
    "mlp.fc1": "pwconv1",
    "mlp.fc2": "pwconv2",
}


def _map_llm(name: str) -> str | None:
    if name == "lm_head.weight":
        return name
    if re.match(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$", name):
        return EXPECTED_UNUSED
    if re.match(r"model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\.)", name):
        return "model.language_model." + name[len("model.") :]
    return None


def _map_clip(rest: str) -> str | None:
    if rest.startswith("post_layernorm.") or rest == "embeddings.position_ids":
        return EXPECTED_UNUSED
    if rest in (
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.position_embedding.weight",
    ):
        return rest
    if re.match(r"pre_layrnorm\.(weight|bias)$", rest):
        return "pre_layernorm." + rest.split(".")[-1]
    match = re.match(r"encoder\.layers\.(\d+\..+)$", rest)
    if match:
        return "layers." + match.group(1)
    return None


def _map_convnext(rest: str) -> str | None:
    if rest.startswith("head."):
        return EXPECTED_UNUSED
    match = re.match(r"stem\.([01])\.(weight|bias)$", rest)
    if match:
        part = "patch_embeddings" if match.group(1) == "0" else "layernorm"
        return f"embeddings.{part}.{match.group(2)}"
    match = re.match(r"stages\.(\d+)\.downsample\.([01])\.(weight|bias)$", rest)
    if match:
        return f"stages.{match.group(1)}.downsampling_layer.{match.group(2)}.{match.group(3)}"
    match = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)$", rest)
    if match:
        stage, block, part = match.groups()
        prefix = f"stages.{stage}.layers.{block}."
        if part in ("weight", "gamma"):
            return prefix + "layer_scale_parameter"
        module, _, kind = part.rpartition(".")
        if module in CONVNEXT_BLOCK_PARTS and kind in ("weight", "bias"):
            return prefix + f"{CONVNEXT_BLOCK_PARTS[module]}.{kind}"
    return None


def _map_interaction(rest: str) -> str | None:
    match = re.match(r"interactions\.(\d+)\.interaction_units_(\d)(\d)\.(.+)$", rest)
    if not match:
        return None
    interaction, first, second, part = match.groups()
    if int(second) != int(first) + 1:
        return None
    for official, ours in INTERACTION_RENAMES:
        if part.startswith(official):
            inner = part[len(official) :]
            if official.endswith("proj."):
                return None if inner not in ("weight", "bias") else f"{_unit(interaction, first)}.{ours}{inner}"
            if inner in INJECTOR_GATES:
                return f"{_unit(interaction, first)}.{ours}{INJECTOR_GATES[inner]}"
            if INJECTOR_PARTS.match(inner):
                return f"{_unit(interaction, first)}.{ours}{inner}"
            return None
    return None


def _unit(interaction: str, first_branch: str) -> str:
    return f"interactions.{interaction}.units.{int(first_branch) - 1}"


def _map_projector(rest: str, projector_norm: str) -> str | None:
    match = re.match(r"branch(\d+)\.(\d+)\.(weight|bias)$", rest)
    if not match:
        return None
    branch, index, kind = match.groups()
    module = PROJECTOR_INDEXES[projector_norm].get(index)
    if module is None:
        return None
    return f"model.multi_modal_projector.branches.{int(branch) - 1}.{module}.{kind}"


def map_released_key(name: str, projector_norm: str = "group_norm") -> str | None:
    """Our parameter name for an official one, EXPECTED_UNUSED, or None when no rule applies."""
    if name.startswith(VISION_PREFIX):
        rest = name[len(VISION_PREFIX) :]
        match = re.match(r"branch(\d+)\.(clip_model|convnext_model)\.(.+)$", rest)
        if match:
            number, kind, inner = match.groups()
            mapped = _map_clip(inner) if kind == "clip_model" else _map_convnext(inner)
            if mapped in (None, EXPECTED_UNUSED):
                return mapped
            return f"model.vision_tower.branches.{int(number) - 1}.{mapped}"
        mapped = _map_interaction(rest)
        return None if mapped is None else f"model.vision_tower.{mapped}"
    if name.startswith(PROJECTOR_PREFIX):
        return _map_projector(name[len(PROJECTOR_PREFIX) :], projector_norm)
    return _map_llm(name)


__all__ = ["EXPECTED_UNUSED", "PARAMETER_FREE_NORM_FILL", "PROJECTOR_INDEXES", "map_released_key"]
