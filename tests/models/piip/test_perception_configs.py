"""The released perception configs: read as data, bundled as JSON, and counted by `piip-llava flops`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from piip_llava.cli import main
from piip_llava.conversion.perception import (
    PerceptionConversionError,
    config_json,
    official_table_figures,
    perception_config_from_file,
    perception_config_from_official,
    read_official_config,
)
from piip_llava.flops import count_perception_cost, load_vision_config

ROOT = Path(__file__).resolve().parents[3]
RELEASED = ROOT / "tests" / "fixtures" / "released_configs_perception"
BUNDLED = ROOT / "configs" / "perception"
RELEASED_FILES = sorted(RELEASED.rglob("*.py"))

# Released configs this port does not build, and why (the refusal names it).
UNSUPPORTED = {
    "mask_rcnn_convnext-base_1024_regular-fpn": "not a PIIP backbone",
    "mask_rcnn_deit_vit_b_fpn_1x_coco_bs16": "not a PIIP backbone",
    "mask_rcnn_deit_vit_l_fpn_1x_coco_bs16": "not a PIIP backbone",
    "mask_rcnn_internvit_6b_fpn_1x_coco_bs16_ms": "not a PIIP backbone",
    "upernet_internvit_6b_512_80k_ade20k_bs16_lr4e-5": "not a PIIP backbone",
}


def test_the_released_configs_are_all_here():
    assert len(RELEASED_FILES) == 41
    assert len(UNSUPPORTED) == 5  # the single-branch baselines
    assert len(list(BUNDLED.glob("*.json"))) == 41 - 5


@pytest.mark.parametrize("path", RELEASED_FILES, ids=lambda path: path.stem)
def test_each_released_config_is_bundled_or_refused_with_its_reason(path):
    bundled = BUNDLED / f"{path.stem}.json"
    if path.stem in UNSUPPORTED:
        with pytest.raises(PerceptionConversionError, match=re.escape(UNSUPPORTED[path.stem])):
            perception_config_from_file(str(path))
        assert not bundled.exists()
        return
    config, _ = perception_config_from_file(str(path))
    assert bundled.read_text() == config_json(config), "regenerate with scripts/make_perception_configs.py"


def test_released_detectors_read_as_the_official_code_builds_them():
    config, codebase = perception_config_from_file(
        str(RELEASED / "mmdetection/configs/piip/3branch/mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16.py")
    )
    assert codebase == "mmdet" and config.resize_position_embeddings
    assert [branch.image_size for branch in config.branch_configs] == [672, 1120, 1568]
    assert [branch.hidden_size for branch in config.branch_configs] == [768, 384, 192]
    assert all(branch.window_sizes == [14] * 12 for branch in config.branch_configs)
    assert all(branch.window_padding == "tokens" for branch in config.branch_configs)  # use_flash_attn=True
    assert config.out_features == ["fpn1", "fpn2", "fpn3", "fpn4"]

    tsbl, _ = perception_config_from_file(
        str(RELEASED / "mmdetection/configs/piip/4branch/mask_rcnn_deit_tsbl_1568_1120_672_448_fpn_1x_coco_bs16.py")
    )
    # det/piip_4branch.py builds branch 4 from branch 3's dict: deit-S, at branch 4's own size.
    assert [branch.hidden_size for branch in tsbl.branch_configs] == [1024, 768, 384, 384]
    assert tsbl.branch_configs[3].image_size == 1568

    dino, _ = perception_config_from_file(
        str(RELEASED / "mmdetection/configs/piip/3branch/dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms.py")
    )
    assert dino.out_features == ["fpn2", "fpn3", "fpn4"] and dino.build_fpn1  # the 3-branch file still builds fpn1

    segmenter, codebase = perception_config_from_file(
        str(RELEASED / "mmsegmentation/configs/piip/2branch/upernet_internvit_h6b_256_512_80k_ade20k_bs16_lr4e-5.py")
    )
    first = segmenter.branch_configs[0]
    assert codebase == "mmseg" and not segmenter.resize_position_embeddings
    assert (first.branch_type, first.norm_type, first.qk_norm, first.hidden_act) == (
        "internvit", "rms_norm", True, "gelu_pytorch_tanh"
    )
    assert not segmenter.interaction_norm  # norm_layer='none'


def test_released_convnext_detectors_read_as_the_official_code_builds_them():
    config, _ = perception_config_from_file(
        str(RELEASED / "mmdetection/configs/piip/convnext/mask_rcnn_convnext-t_vit-s_convnext-b_1024_672_448_regular-fpn.py")
    )
    branches = config.branch_configs
    assert [branch.branch_type for branch in branches] == ["convnext", "deit", "convnext"]
    assert branches[0].convnext_config["hidden_sizes"] == [128, 256, 512, 1024]  # facebook/convnext-base-224
    assert branches[2].convnext_config["depths"] == [3, 3, 9, 3]  # facebook/convnext-tiny-224
    assert (config.with_simple_fpn, config.out_interaction_indexes) == (False, [0, 1, 10])
    # The official neck takes in_channels=[128, 256, 512, 1024]: branch 1's width where each map is merged.
    assert config.merge_widths() == [128, 256, 512, 1024]


def test_released_beit_detector_reads_as_the_official_code_builds_it():
    config, _ = perception_config_from_file(
        str(RELEASED / "mmdetection/configs/piip/3branch/mask_rcnn_beit_sbl_1568_1120_672_fpn_1x_coco_bs16.py")
    )
    beit_large, beit_base, deit_small = config.branch_configs
    assert [branch.branch_type for branch in config.branch_configs] == ["beit", "beit", "deit"]
    assert (beit_large.hidden_size, beit_large.num_hidden_layers, beit_base.hidden_size) == (1024, 24, 768)
    assert beit_large.position_grid is None and beit_large.layer_scale_init == 1e-6  # use_abs_pos_emb=False, init_values
    assert beit_large.window_sizes == [28] * 24 and deit_small.window_sizes == [28] * 12


def test_released_uniperceiver_detector_reads_as_the_official_code_builds_it():
    config, _ = perception_config_from_file(
        str(RELEASED / "mmdetection/configs/piip/3branch/mask_rcnn_uniperceiver_sbl_1568_1120_672_fpn_1x_coco_bs16.py")
    )
    large, _, small = config.branch_configs
    assert [branch.branch_type for branch in config.branch_configs] == ["uniperceiver", "uniperceiver", "deit"]
    assert (large.hidden_size, large.num_hidden_layers, large.qkv_bias, large.position_grid) == (1024, 24, True, 14)
    assert large.window_padding == "tokens" and small.window_padding == "tokens"


def test_convnext_branches_that_do_not_match_their_checkpoint_are_refused(tmp_path):
    path = RELEASED / "mmdetection/configs/piip/convnext/mask_rcnn_convnext-tsb_1024_672_448_regular-fpn.py"
    names = read_official_config(str(path))
    names["model"]["backbone"]["branch3"]["downsample_ratios"] = [4] * 21
    with pytest.raises(PerceptionConversionError, match=r"branch3: downsample_ratios \[4, 4, .*whose strides are \[4, 4, 4, 8,"):
        perception_config_from_official(names)
    names = read_official_config(str(path))
    names["model"]["backbone"]["branch2"]["pretrained"] = "./my-convnext"
    with pytest.raises(PerceptionConversionError, match="branch2: pretrained='./my-convnext' .* put the ConvNeXt's config.json there"):
        perception_config_from_official(names, base_dir=str(tmp_path))
    names["model"]["backbone"]["branch2"]["layer_scale"] = 0.5
    with pytest.raises(PerceptionConversionError, match=r"branch2: unknown keys \['layer_scale'\] for a ConvNeXt branch"):
        perception_config_from_official(names, base_dir=str(tmp_path))


def test_unknown_keys_and_branch_types_are_refused_by_name():
    backbone = {
        "type": "PIIPTwoBranch",
        "branch1": {"real_size": 32, "pretrained": "deit_s.pth", "depth": 1, "embed_dim": 64, "num_heads": 2,
                    "interaction_indexes": [[0, 0]], "colour": "red"},
        "branch2": {"real_size": 64, "pretrained": "deit_t.pth", "depth": 1, "embed_dim": 32, "num_heads": 1,
                    "interaction_indexes": [[0, 0]]},
    }  # fmt: skip
    with pytest.raises(PerceptionConversionError, match=r"branch1: unknown keys \['colour'\]"):
        perception_config_from_official({"model": {"backbone": backbone}})
    del backbone["branch1"]["colour"]
    backbone["branch2"]["pretrained"] = "uni-perceiver-base.pth"
    with pytest.raises(PerceptionConversionError, match="branch2: .* names a Uni-Perceiver; .* mmdetection wrapper only"):
        perception_config_from_official({"model": {"backbone": backbone, "decode_head": {"type": "UPerHead"}}})
    backbone["branch2"]["pretrained"] = "deit_t.pth"
    backbone["branch2"]["use_abs_pos_emb"] = True
    with pytest.raises(PerceptionConversionError, match=r"branch2: \['use_abs_pos_emb'\] are options of the official BEiT wrapper"):
        perception_config_from_official({"model": {"backbone": backbone}})
    del backbone["branch2"]["use_abs_pos_emb"]
    backbone["branch2"]["pretrained"] = "deit_t.pth"
    backbone["with_extra_magic"] = True
    with pytest.raises(PerceptionConversionError, match=r"unknown keys \['with_extra_magic'\]"):
        perception_config_from_official({"model": {"backbone": backbone}})


def official_table() -> dict[str, tuple[float | None, float]]:
    return official_table_figures((RELEASED / "released_models_tables.md").read_text())


@pytest.mark.parametrize(
    "name",
    [
        "piip_3branch_tsb_368-192-128_cls_token_deit1",  # 144M, 17.4G
        "mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16",  # 149M, 453G
        "mask_rcnn_deit_sbl_1120_672_448_fpn_1x_coco_bs16",  # windows padded (grid 42 and 70, window 28)
        "mask_rcnn_convnext-tsb_1024_672_448_regular-fpn",  # 326G, three ConvNeXt branches
        "mask_rcnn_vit-t_convnext-s_vit-b_1024_672_448_regular-fpn",  # 291G, 4x / 2x up-sampling left out
    ],
)
def test_flops_match_the_official_tables(name):
    """The other released configs are compared by benchmarks/perception_flops.py (docs/perception.md)."""
    expected_params, expected_gflops = official_table()[name]
    cost = count_perception_cost(load_vision_config(name))
    if expected_params is not None:  # the ConvNeXt table gives FLOPs only
        assert cost.parameters / 1e6 == pytest.approx(expected_params, rel=0.05)
    assert cost.gflops == pytest.approx(expected_gflops, rel=0.05)


def test_flops_cli_prints_the_perception_table(capsys):
    assert main(["flops", "piip_3branch_tsb_368-192-128_cls_token_deit1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [component["name"] for component in report["components"]]
    assert names == [
        "branch 1 (deit-768 @ 128)",
        "branch 2 (deit-384 @ 192)",
        "branch 3 (deit-192 @ 368)",
        "interactions",
        "classification heads",
    ]
    assert report["image_size"] == 368
