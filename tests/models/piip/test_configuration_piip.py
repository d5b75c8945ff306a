"""PIIPBranchConfig / PIIPVisionConfig / PIIPLlavaConfig: typed sub-configs, one validation, the saved JSON layout.

In the manner of transformers' ConfigTester: a tiny config, then one test per property a user relies on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import clip_convnext_branches, three_branches, tiny_clip_backbone, tiny_vision_config, two_clip_branches
from huggingface_hub.errors import StrictDataclassError, StrictDataclassFieldValidationError
from transformers import CLIPVisionConfig, ConvNextConfig

from piip_llava import PIIPLlavaConfig
from piip_llava.models.piip import PIIPBranchConfig, PIIPVisionConfig, PIIPVisionModel
from piip_llava.models.piip.branches import BRANCH_ADAPTERS
from piip_llava.models.piip.configuration_piip import BRANCH_FAMILIES

REPO = Path(__file__).resolve().parents[3]
# Encoder and whole-model configs as the project has written them (a converted checkpoint's config.json has
# the demo model's layout).
SAVED_CONFIGS = sorted(REPO.glob("configs/*.json")) + [REPO / "piip_llava/assets/demo_model/config.json"]


def vision_part(data: dict) -> dict:
    return data.get("vision_config", data)


def test_branches_hold_real_backbone_sub_configs():
    config = tiny_vision_config(clip_convnext_branches())
    clip, convnext = config.branches
    assert isinstance(clip, PIIPBranchConfig) and isinstance(clip.backbone_config, CLIPVisionConfig)
    assert isinstance(convnext.backbone_config, ConvNextConfig)
    assert (clip.patch_size, clip.patch_stride, clip.pretrain_grid_size, clip.use_cls_token) == (16, 16, 4, True)
    assert convnext.patch_size is None and convnext.final_geometry() == (32, 4)


@pytest.mark.parametrize("path", SAVED_CONFIGS, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_saved_json_keeps_its_layout_through_a_round_trip(path):
    """Every shipped config.json (old layout: branches as dicts) loads, and writes the same branch layout back."""
    stored = vision_part(json.loads(path.read_text()))
    config = PIIPVisionConfig(**{key: value for key, value in stored.items() if key != "model_type"})
    written = config.to_dict()
    assert [set(branch) for branch in written["branches"]] == [set(branch) for branch in stored["branches"]]
    for mine, theirs in zip(written["branches"], stored["branches"]):
        assert {key: mine[key] for key in theirs if key != "backbone_config"} == {
            key: value for key, value in theirs.items() if key != "backbone_config"
        }
        assert {key: mine["backbone_config"][key] for key in theirs["backbone_config"]} == theirs["backbone_config"]
    assert PIIPVisionConfig.from_dict(written).to_dict() == written


def test_branch_config_objects_and_dicts_build_the_same_config():
    as_dicts = tiny_vision_config(two_clip_branches())
    as_objects = tiny_vision_config([PIIPBranchConfig(**branch) for branch in two_clip_branches()])
    assert as_objects.to_dict() == as_dicts.to_dict()


def test_attention_implementation_reaches_every_branch():
    config = tiny_vision_config(three_branches(), attn_implementation="eager")
    assert [branch.backbone_config._attn_implementation for branch in config.branches] == ["eager"] * 3
    llava = PIIPLlavaConfig(vision_config=config, text_config={"model_type": "llama", "hidden_size": 64})
    llava._attn_implementation = "sdpa"
    assert [branch.backbone_config._attn_implementation for branch in llava.vision_config.branches] == ["sdpa"] * 3


def test_model_set_attn_implementation_switches_the_branches_without_a_forward():
    model = PIIPVisionModel(tiny_vision_config(two_clip_branches()))
    model.set_attn_implementation("eager")
    layer = model.branches[1].layers[0].self_attn
    assert layer.config._attn_implementation == "eager"
    assert model.config.branches[1].backbone_config is model.branches[1].config  # one object, no copies to sync


def test_every_branch_family_has_an_adapter():
    assert set(BRANCH_FAMILIES) == set(BRANCH_ADAPTERS)


def test_image_size_in_a_config_json_is_accepted_when_it_agrees_and_refused_clearly_otherwise(tmp_path):
    data = tiny_vision_config(two_clip_branches()).to_dict()
    data["image_size"] = 128
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    assert PIIPVisionConfig.from_json_file(str(path)).image_size == 128
    data["image_size"] = 224
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"image_size 224 disagrees with the branches' resolutions \[64, 128\]"):
        PIIPVisionConfig.from_json_file(str(path))
    config = tiny_vision_config(two_clip_branches())
    with pytest.raises(ValueError, match="change a branch's image_size instead"):
        config.image_size = 96


def test_vision_config_reports_hidden_size_of_the_last_branch():
    assert tiny_vision_config(clip_convnext_branches()).hidden_size == 32


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"deform_num_heads": 3}, (r"Branch 2, interaction 1: the deformable value width \(32 x deform_ratio 0.5\) 16 "
                                  r"is not divisible by deform_num_heads 3")),
        ({"interaction_attention": "normal", "deform_num_heads": 5}, "the query width 48 is not divisible"),
    ],
)
def test_interaction_heads_must_divide_the_widths(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_vision_config(two_clip_branches(), **options)


def test_backbone_heads_must_divide_its_width():
    """The backbone's own config refuses it, once, while the branch config is built."""
    branches = two_clip_branches()
    branches[1]["backbone_config"] = tiny_clip_backbone(32, 2, 3)
    with pytest.raises(StrictDataclassError, match=r"hidden size \(32\) is not a multiple of .* heads \(3\)"):
        tiny_vision_config(branches)


def test_vit_only_options_are_refused_on_convolutional_branches():
    branches = clip_convnext_branches()
    branches[1]["patch_size"] = 16
    with pytest.raises(ValueError, match="patch_size applies to ViT branches only, not to a convnext branch"):
        tiny_vision_config(branches)


def test_option_strings_are_literals():
    with pytest.raises(StrictDataclassFieldValidationError, match="interaction_attention.*expected one of"):
        tiny_vision_config(two_clip_branches(), interaction_attention="global")


def test_a_branch_without_interaction_groups_is_one_group_of_all_blocks():
    branch = PIIPBranchConfig(backbone_config=tiny_clip_backbone(32, 3, 2), image_size=64)
    assert branch.interaction_groups == [[0, 2]]


def test_dinov2_is_refused_until_it_has_an_adapter():
    branches = two_clip_branches()
    branches[0]["backbone_config"] = {"model_type": "dinov2", "hidden_size": 48, "num_attention_heads": 4}
    with pytest.raises(ValueError, match="Unsupported branch backbone model_type 'dinov2'"):
        tiny_vision_config(branches)


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    config = tiny_vision_config(three_branches(), interaction_attention="normal")
    config.save_pretrained(tmp_path)
    reloaded = PIIPVisionConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    torch.manual_seed(0)
    model = PIIPVisionModel(config).eval()
    model.save_pretrained(tmp_path / "model")
    again = PIIPVisionModel.from_pretrained(tmp_path / "model").eval()
    pixel_values = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for expected, actual in zip(model(pixel_values).feature_maps, again(pixel_values).feature_maps):
            torch.testing.assert_close(actual, expected, atol=0, rtol=0)
