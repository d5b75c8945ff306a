"""The released Python config files: read as data only, and translated into our committed configs."""

from __future__ import annotations

import glob
import json
import os

import pytest

import piip_llava  # noqa: F401  (registers the Auto classes)
from piip_llava.conversion import UnsafeConfigError, parse_python_config, read_python_config
from piip_llava.conversion.key_mapping import EXPECTED_UNUSED, map_released_key
from piip_llava.conversion.released_config import VICUNA_V15_TEXT_CONFIGS, piip_llava_config_from_released
from piip_llava.models.piip_llava import PIIPLlavaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
RELEASED = sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "released_configs", "*.py")))


def test_all_nine_released_configs_are_present():
    assert len(RELEASED) == 9


@pytest.mark.parametrize("path", RELEASED, ids=os.path.basename)
def test_released_config_converts_to_the_committed_config(path):
    name = os.path.basename(path)[: -len(".py")]
    llm_size = name.rsplit("_", 1)[1]
    parsed = piip_llava_config_from_released(VICUNA_V15_TEXT_CONFIGS[llm_size], read_python_config(path))
    with open(os.path.join(ROOT, "configs", f"{name}.json"), encoding="utf-8") as handle:
        committed = json.load(handle)
    as_written = json.loads(parsed.to_json_string(use_diff=True))
    as_written.pop("transformers_version", None)
    assert as_written == committed
    assert PIIPLlavaConfig(**committed).to_dict() == parsed.to_dict()
    text = parsed.text_config
    expected_llm = {"7B": (4096, 32, 32, 11008), "13B": (5120, 40, 40, 13824)}[llm_size]
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == expected_llm
    assert (text.vocab_size, parsed.image_token_index, text.max_position_embeddings) == (32001, 32000, 4096)


def test_released_settings_land_in_our_config():
    path = next(p for p in RELEASED if p.endswith("piip-llava_convnext-b_clip-l_1024-336_7B.py"))
    config = piip_llava_config_from_released(VICUNA_V15_TEXT_CONFIGS["7B"], read_python_config(path))
    vision = config.vision_config
    assert (vision.interaction_attention, vision.deform_num_heads, vision.deform_num_points) == ("deform", 16, 4)
    assert (vision.deform_ratio, vision.with_cffn, vision.cffn_ratio, vision.interaction_proj) == (
        0.5,
        True,
        0.25,
        True,
    )
    clip, convnext = vision.branches
    assert (clip.image_size, clip.patch_size, clip.pretrain_grid_size) == (336, 16, 21)
    assert clip.backbone_config.hidden_size == 1024 and clip.use_cls_token is True
    assert convnext.backbone_config.depths == [3, 3, 27, 3]
    assert convnext.backbone_config.hidden_sizes == [128, 256, 512, 1024]
    assert convnext.image_size == 1024 and len(convnext.interaction_groups) == 12
    assert config.projector_norm == "group_norm" and config.num_image_tokens == 32 * 32


def test_parser_accepts_plain_data_only():
    source = "model = dict(a=1, b=[1, -2.5, (3, 'x')], c={'k': None, 'd': dict(e=True)})\nother = 3\n"
    assert parse_python_config(source) == {
        "model": {"a": 1, "b": [1, -2.5, (3, "x")], "c": {"k": None, "d": {"e": True}}},
        "other": 3,
    }


@pytest.mark.parametrize(
    "source",
    [
        "import os\nmodel = dict()",
        "model = dict(a=__import__('os').system('true'))",
        "model = dict(a=open('x'))",
        "model = dict(a=os.environ)",
        "model = dict(**{'a': 1})",
        "model = dict([('a', 1)])",
        "model = [x for x in range(3)]",
        "model = dict(a=1 + 2)",
        "model = (lambda: 1)()",
        "def f():\n    pass\nmodel = dict()",
        "model.backbone = 1",
    ],
)
def test_parser_refuses_code(source):
    with pytest.raises(UnsafeConfigError, match="not plain data|statement|assignment"):
        parse_python_config(source, "bad.py")


def test_parser_never_executes(tmp_path):
    marker = tmp_path / "executed"
    source = f"open({str(marker)!r}, 'w').write('x')\nmodel = dict(backbone=dict())\n"
    (tmp_path / "config.py").write_text(source)
    with pytest.raises(UnsafeConfigError):
        read_python_config(tmp_path / "config.py")
    assert not marker.exists()


@pytest.mark.parametrize(
    "official, ours",
    [
        ("model.layers.3.mlp.up_proj.weight", "model.language_model.layers.3.mlp.up_proj.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", EXPECTED_UNUSED),
        (
            "model.vision_tower.vision_tower.branch1.clip_model.pre_layrnorm.bias",
            "model.vision_tower.branches.0.pre_layernorm.bias",
        ),
        (
            "model.vision_tower.vision_tower.branch2.clip_model.encoder.layers.4.self_attn.q_proj.weight",
            "model.vision_tower.branches.1.layers.4.self_attn.q_proj.weight",
        ),
        ("model.vision_tower.vision_tower.branch1.clip_model.post_layernorm.weight", EXPECTED_UNUSED),
        (
            "model.vision_tower.vision_tower.branch2.convnext_model.stages.2.blocks.5.gamma",
            "model.vision_tower.branches.1.stages.2.layers.5.layer_scale_parameter",
        ),
        (
            "model.vision_tower.vision_tower.branch2.convnext_model.stages.2.blocks.5.weight",
            "model.vision_tower.branches.1.stages.2.layers.5.layer_scale_parameter",
        ),
        (
            "model.vision_tower.vision_tower.branch2.convnext_model.stages.1.downsample.1.weight",
            "model.vision_tower.branches.1.stages.1.downsampling_layer.1.weight",
        ),
        ("model.vision_tower.vision_tower.branch2.convnext_model.head.fc.weight", EXPECTED_UNUSED),
        (
            "model.vision_tower.vision_tower.interactions.3.interaction_units_23.branch2to1_injector.ca_weight",
            "model.vision_tower.interactions.3.units.1.injector_into_a.attn_gate",
        ),
        (
            "model.vision_tower.vision_tower.interactions.0.interaction_units_12.branch1to2_injector.attn.wk.weight",
            "model.vision_tower.interactions.0.units.0.injector_into_b.attn.wk.weight",
        ),
        (
            "model.vision_tower.vision_tower.interactions.0.interaction_units_12.branch1to2_injector.ffn.dwconv.dwconv.bias",
            "model.vision_tower.interactions.0.units.0.injector_into_b.ffn.dwconv.dwconv.bias",
        ),
        ("model.mm_projector.branch2.3.weight", "model.multi_modal_projector.branches.1.norm.weight"),
        ("model.mm_projector.branch1.6.bias", "model.multi_modal_projector.branches.0.linear_2.bias"),
        ("model.mm_projector.branch1.7.bias", None),
        ("model.vision_tower.vision_tower.branch1.clip_model.something.weight", None),
    ],
)
def test_key_mapping(official, ours):
    assert map_released_key(official, "group_norm") == ours


def test_layer_norm_projector_indexes():
    assert map_released_key("model.mm_projector.branch1.5.weight", "layer_norm") == (
        "model.multi_modal_projector.branches.0.linear_2.weight"
    )
    assert map_released_key("model.mm_projector.branch1.3.weight", "layer_norm") is None
