"""Bundled encoder configs, the FLOP counter, and `piip-llava flops`."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from piip_llava.cli import main
from piip_llava.flops import (
    bundled_config_names,
    count_encoder_cost,
    load_vision_config,
    resolve_config_path,
)
from piip_llava.models.piip import PIIPVisionConfig, PIIPVisionModel

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"
ALL_CONFIGS = sorted(CONFIG_DIR.glob("*.json"))
# Whole-model configs of the released checkpoints (model_type piip_llava) sit beside the encoder configs.
MODEL_CONFIGS = [path for path in ALL_CONFIGS if json.loads(path.read_text()).get("model_type") == "piip_llava"]
TINY_CONFIGS = ["tiny_clip_clip", "tiny_convnext_clip", "tiny_siglip_clip"]

# Spec section 9: encoder GFLOPs (multiply-adds) of the published variants.
PUBLISHED_GFLOPS = {
    "piip_vision_clip-l14_336": 191,
    "piip_vision_clip-bl_512-256": 193,
    "piip_vision_convnext-b_clip-l_640-224": 191,
    "piip_vision_clip-bl_512-448": 422,
    "piip_vision_convnext-b_clip-l_1024-336": 598,
    "piip_vision_convnext-l_clip-l_1024-336": 1037,
}
# The 13B ConvNeXt checkpoints use these 24-interaction encoders (released configs); the Plus one does not.
TWENTY_FOUR_INTERACTION_VARIANTS = {
    "piip_vision_convnext-b_clip-l_1024-336_24-interactions": "piip_vision_convnext-b_clip-l_1024-336",
    "piip_vision_convnext-l_clip-l_1024-336_24-interactions": "piip_vision_convnext-l_clip-l_1024-336",
}

# fmt: off
CONVNEXT_12_GROUPS = [[0, 2], [3, 6], [7, 10], [11, 13], [14, 16], [17, 19], [20, 22], [23, 25], [26, 28], [29, 31],
                      [32, 34], [35, 38]]
CONVNEXT_24_GROUPS = [[0, 1], [2, 2], [3, 4], [5, 6], [7, 9], [10, 10], [11, 12], [13, 13], [14, 15], [16, 16],
                      [17, 18], [19, 19], [20, 21], [22, 22], [23, 24], [25, 25], [26, 27], [28, 28], [29, 30],
                      [31, 31], [32, 33], [34, 34], [35, 36], [37, 38]]
# fmt: on


def blocks_in_pairs(count: int, width: int) -> list[list[int]]:
    return [[index * width, index * width + width - 1] for index in range(count)]


# (branch image sizes, interaction groups per branch, pretrained grid sizes of the ViT branches), spec section 9.
PUBLISHED_LAYOUTS = {
    "piip_vision_clip-l14_336": ([336], [[[0, 23]]], [24]),
    "piip_vision_clip-bl_512-256": ([256, 512], [blocks_in_pairs(2, 12), blocks_in_pairs(2, 6)], [14, 14]),
    "piip_vision_clip-bl_512-448": ([448, 512], [blocks_in_pairs(12, 2), blocks_in_pairs(12, 1)], [21, 14]),
    "piip_vision_convnext-b_clip-l_640-224": ([224, 640], [blocks_in_pairs(2, 12), [[0, 19], [20, 38]]], [14]),
    "piip_vision_convnext-b_clip-l_1024-336": ([336, 1024], [blocks_in_pairs(12, 2), CONVNEXT_12_GROUPS], [21]),
    "piip_vision_convnext-l_clip-l_1024-336": ([336, 1024], [blocks_in_pairs(12, 2), CONVNEXT_12_GROUPS], [21]),
    "piip_vision_convnext-b_clip-l_1024-336_24-interactions": (
        [336, 1024],
        [blocks_in_pairs(24, 1), CONVNEXT_24_GROUPS],
        [21],
    ),
    "piip_vision_convnext-l_clip-l_1024-336_24-interactions": (
        [336, 1024],
        [blocks_in_pairs(24, 1), CONVNEXT_24_GROUPS],
        [21],
    ),
}


@functools.cache
def cost_of(name: str):
    return count_encoder_cost(load_vision_config(name))


# ----- configs -----------------------------------------------------------------------------------
def test_every_published_and_tiny_config_is_bundled():
    assert set(PUBLISHED_LAYOUTS) | set(TINY_CONFIGS) <= {path.stem for path in ALL_CONFIGS}
    perception = {path.stem for path in (CONFIG_DIR / "perception").glob("*.json")}
    assert set(bundled_config_names()) == {path.stem for path in ALL_CONFIGS} | perception


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda path: path.stem)
def test_config_file_loads_and_round_trips(path):
    """Encoder configs load directly; whole-model configs through their `vision_config`."""
    config = load_vision_config(path)
    if path not in MODEL_CONFIGS:
        assert PIIPVisionConfig.from_json_file(str(path)).branches == config.branches
    reloaded = PIIPVisionConfig.from_dict(config.to_dict())
    assert reloaded.branches == config.branches
    assert reloaded.interaction_attention == config.interaction_attention


@pytest.mark.parametrize("name", sorted(PUBLISHED_LAYOUTS))
def test_published_layout_matches_spec(name):
    image_sizes, groups, grids = PUBLISHED_LAYOUTS[name]
    config = load_vision_config(name)
    specs = config.branches
    assert [spec.image_size for spec in specs] == image_sizes
    assert [spec.interaction_groups for spec in specs] == groups
    assert [spec.pretrain_grid_size for spec in specs if not spec.is_convolutional] == grids
    assert (config.interaction_attention, config.deform_num_heads, config.deform_num_points) == ("deform", 16, 4)
    assert (config.deform_ratio, config.with_cffn, config.cffn_ratio) == (0.5, True, 0.25)
    assert config.interaction_proj and config.interaction_drop_path_rate == 0.4
    for spec in specs:
        if spec.is_convolutional:
            assert spec.backbone_config.depths == [3, 3, 27, 3]
        else:
            large = spec.backbone_config.hidden_size == 1024
            expected = (24, 16, 4096) if large else (12, 12, 3072)
            backbone = spec.backbone_config
            assert (backbone.num_hidden_layers, backbone.num_attention_heads, backbone.intermediate_size) == expected
            assert backbone.hidden_act == "quick_gelu"
            assert spec.patch_size == (14 if name == "piip_vision_clip-l14_336" else 16)


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda path: path.stem)
def test_checkpoint_configs_use_a_bundled_encoder(path):
    """Each released checkpoint's encoder is one of the encoder configs counted here."""
    encoder = load_vision_config(path)
    matches = [
        name
        for name in PUBLISHED_LAYOUTS
        if load_vision_config(name).to_dict() | {"transformers_version": None}
        == encoder.to_dict() | {"transformers_version": None}
    ]
    assert len(matches) == 1


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_tiny_configs_are_tiny_and_run(name):
    config = load_vision_config(name)
    assert config.image_size <= 128
    torch.manual_seed(0)
    model = PIIPVisionModel(config).eval()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    assert 100_000 < parameters < 1_000_000
    assert parameters == cost_of(name).parameters  # the meta-device count agrees with a real model
    with torch.no_grad():
        feature_maps = model(torch.randn(1, 3, config.image_size, config.image_size)).feature_maps
    widths_and_grids = [branch.final_geometry() for branch in config.branches]
    assert [tuple(feature_map.shape) for feature_map in feature_maps] == [
        (1, width, grid, grid) for width, grid in widths_and_grids
    ]


# ----- FLOPs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED_GFLOPS))
def test_published_gflops_within_five_percent(name):
    measured = cost_of(name).gflops
    assert measured == pytest.approx(PUBLISHED_GFLOPS[name], rel=0.05)


def test_baseline_count_matches_closed_form():
    """CLIP-L/14 at 336: 576 patches + class token; per layer 12 N D^2 (projections, MLP) + 2 N^2 D (attention)."""
    tokens, width, layers = 577, 1024, 24
    patch_embedding = 576 * width * 3 * 14 * 14
    expected = patch_embedding + layers * (12 * tokens * width**2 + 2 * tokens**2 * width)
    cost = cost_of("piip_vision_clip-l14_336")
    assert cost.macs == expected
    assert [component.name for component in cost.components] == ["branch 1 (clip_vision_model @ 336)", "interactions"]
    assert cost.components[1].macs == cost.components[1].parameters == 0


@pytest.mark.parametrize("name", sorted(TWENTY_FOUR_INTERACTION_VARIANTS))
def test_twenty_four_interaction_encoders_only_add_interaction_cost(name):
    """Same branches as the 12-interaction encoder; twice the interaction units.

    The spec table gives the 13B ConvNeXt encoders the 7B numbers (598 and 1037), but their released
    configs have 24 interactions, which cost ~125 and ~164 GFLOPs more.
    """
    twelve, twenty_four = cost_of(TWENTY_FOUR_INTERACTION_VARIANTS[name]), cost_of(name)
    assert [(c.parameters, c.macs) for c in twenty_four.components[:2]] == [
        (c.parameters, c.macs) for c in twelve.components[:2]
    ]
    assert twenty_four.components[2].parameters == 2 * twelve.components[2].parameters
    assert twenty_four.components[2].macs > 1.9 * twelve.components[2].macs


def test_components_add_up_and_interactions_are_counted():
    cost = cost_of("piip_vision_clip-bl_512-256")
    assert [component.name for component in cost.components] == [
        "branch 1 (clip_vision_model @ 256)",
        "branch 2 (clip_vision_model @ 512)",
        "interactions",
    ]
    assert cost.macs == sum(component.macs for component in cost.components)
    assert 0 < cost.components[2].macs < 0.05 * cost.macs


# ----- config resolution and the command -------------------------------------------------------
def test_resolve_config_by_name_path_and_model_folder(tmp_path):
    by_name = resolve_config_path("tiny_clip_clip")
    assert by_name == resolve_config_path("tiny_clip_clip.json") == CONFIG_DIR / "tiny_clip_clip.json"
    assert resolve_config_path(str(by_name)) == by_name
    vision = json.loads(by_name.read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "piip_llava", "vision_config": vision}))
    assert load_vision_config(tmp_path).branches == load_vision_config("tiny_clip_clip").branches
    with pytest.raises(ValueError, match="tiny_clip_clip"):
        resolve_config_path("no_such_config")


def test_cli_prints_table(capsys):
    assert main(["flops", "piip_vision_clip-bl_512-256"]) == 0
    output = capsys.readouterr().out
    assert "branch 1 (clip_vision_model @ 256)" in output
    assert "interactions" in output
    total_row = next(line for line in output.splitlines() if line.startswith("total"))
    assert total_row.split() == ["total", f"{cost_of('piip_vision_clip-bl_512-256').parameters / 1e6:.2f}", "193.48"]


def test_cli_json(capsys):
    assert main(["flops", str(CONFIG_DIR / "tiny_convnext_clip.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cost = cost_of("tiny_convnext_clip")
    assert report["total"] == {"parameters": cost.parameters, "macs": cost.macs, "gflops": cost.gflops}
    assert [component["macs"] for component in report["components"]] == [c.macs for c in cost.components]


def test_cli_unknown_config(capsys):
    assert main(["flops", "no_such_config"]) == 2
    assert "Bundled configs:" in capsys.readouterr().err
