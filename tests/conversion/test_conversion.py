"""Conversion of stand-in checkpoints written in the released PIIP-LLaVA layout.

Each test builds one of our models with random weights, writes it out the way the official code
stores a checkpoint (official key names, the Python vision config, a local pretrained config or
none, .bin or sharded safetensors, the LLaMA tokenizer files), converts it back and checks that
every tensor lands where it came from. The official names are produced by `official_name` below,
written from the official code's module layout independently of the converter's mapping.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

import piip_llava  # noqa: F401  (registers the Auto classes)
from piip_llava.commands.convert import add_parser, parse_branch_override
from piip_llava.conversion import ConversionError, convert_released_checkpoint
from piip_llava.models.piip_llava import PIIPLlavaConfig, PIIPLlavaForConditionalGeneration

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
TOKENIZER_SOURCE = os.path.join(FIXTURES, "official-piip", "clip_clip_deform")
VOCAB = 320  # the stand-in tokenizer's size
LLM = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

CLIP_PARTS = {"pre_layernorm": "pre_layrnorm", "layers": "encoder.layers"}
CONVNEXT_PARTS = [
    (r"embeddings\.patch_embeddings\.", "stem.0."),
    (r"embeddings\.layernorm\.", "stem.1."),
    (r"stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"stages\.(\d+)\.layers\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"stages\.(\d+)\.layers\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
]
UNIT_PARTS = {
    "proj_a_to_b": "branch1to2_proj",
    "proj_b_to_a": "branch2to1_proj",
    "injector_into_a": "branch2to1_injector",
    "injector_into_b": "branch1to2_injector",
}


def official_name(ours: str, kinds: list[str], projector_norm: str, layer_scale_name: str) -> str | None:
    """The official checkpoint's name for one of our parameters (None: the official model has no such tensor)."""
    if ours == "lm_head.weight":
        return ours
    if ours.startswith("model.language_model."):
        return "model." + ours[len("model.language_model.") :]
    match = re.match(r"model\.multi_modal_projector\.branches\.(\d+)\.(\w+)\.(weight|bias)$", ours)
    if match:
        branch, module, kind = match.groups()
        indexes = {
            "group_norm": {"linear_1": 1, "norm": 3, "linear_2": 6},
            "layer_norm": {"linear_1": 1, "linear_2": 5},
        }
        index = indexes[projector_norm].get(module)
        return None if index is None else f"model.mm_projector.branch{int(branch) + 1}.{index}.{kind}"
    vision = "model.vision_tower.vision_tower."
    match = re.match(r"model\.vision_tower\.branches\.(\d+)\.(.+)$", ours)
    if match:
        branch, rest = int(match.group(1)), match.group(2)
        if kinds[branch] == "clip":
            head, _, tail = rest.partition(".")
            return f"{vision}branch{branch + 1}.clip_model.{CLIP_PARTS.get(head, head)}.{tail}"
        if rest.endswith("layer_scale_parameter"):
            rest = re.sub(
                r"stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter", rf"stages.\1.blocks.\2.{layer_scale_name}", rest
            )
        for pattern, replacement in CONVNEXT_PARTS:
            rest = re.sub(pattern, replacement, rest)
        return f"{vision}branch{branch + 1}.convnext_model.{rest}"
    match = re.match(r"model\.vision_tower\.interactions\.(\d+)\.units\.(\d+)\.(\w+)\.(.+)$", ours)
    if match:
        interaction, unit, part, rest = match.groups()
        rest = rest.replace("attn_gate", "ca_weight").replace("ffn_gate", "cffn_weight")
        pair = f"{int(unit) + 1}{int(unit) + 2}"
        return f"{vision}interactions.{interaction}.interaction_units_{pair}.{UNIT_PARTS[part]}.{rest}"
    raise AssertionError(f"no official name for {ours}")


def clip_backbone(hidden, layers, heads, image_size, patch_size):
    return {
        "model_type": "clip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def write_standin(directory, config: PIIPLlavaConfig, python_config: str, kinds, layer_scale_name, weights, seed=0):
    """Our model with random weights, saved in the released layout; returns the reference state dict."""
    torch.manual_seed(seed)
    model = PIIPLlavaForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if config.projector_norm == "layer_norm" and ".multi_modal_projector." in f".{name}" and ".norm." in name:
                continue  # the official LayerNorm projector has no affine parameters: keep 1 / 0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    reference = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    official = {}
    for name, tensor in reference.items():
        official_key = official_name(name, kinds, config.projector_norm, layer_scale_name)
        if official_key is not None:
            official[official_key] = tensor
    vision = "model.vision_tower.vision_tower."
    for number, kind in enumerate(kinds, start=1):  # what the official checkpoints also hold
        if kind == "clip":
            width = reference[f"model.vision_tower.branches.{number - 1}.embeddings.class_embedding"].shape[0]
            official[f"{vision}branch{number}.clip_model.post_layernorm.weight"] = torch.ones(width)
            official[f"{vision}branch{number}.clip_model.post_layernorm.bias"] = torch.zeros(width)
        else:
            official[f"{vision}branch{number}.convnext_model.head.norm.weight"] = torch.ones(32)
            official[f"{vision}branch{number}.convnext_model.head.fc.weight"] = torch.zeros(10, 32)
    os.makedirs(os.path.join(directory, "configs"), exist_ok=True)
    with open(os.path.join(directory, "configs", "piip_standin.py"), "w") as handle:
        handle.write(python_config)
    llava = {**LLM, "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"]}
    llava.update(mm_vision_tower="configs/piip_standin.py", mm_projector_type="mlp2x_gelu", image_aspect_ratio="pad")
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(llava, handle)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(TOKENIZER_SOURCE, name), directory)
    names = sorted(official)
    if weights == "bin":
        torch.save({name: official[name].contiguous() for name in names}, os.path.join(directory, "pytorch_model.bin"))
    else:  # three safetensors shards with an index
        shards = [names[index::3] for index in range(3)]
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            file_name = f"model-{number:05d}-of-00003.safetensors"
            save_file({name: official[name].contiguous() for name in shard}, os.path.join(directory, file_name))
            weight_map.update({name: file_name for name in shard})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as handle:
            json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    return reference, official


# Case A: CLIP (patch-16 kernel from a patch-14 pretrained config, stored locally) + timm ConvNeXt
# (layer scale named `gamma`), plain cross attention, LayerNorm projector, a single .bin file.
CASE_A_PYTHON = """
model = dict(
    backbone=dict(
        n_points=4, deform_num_heads=2, cffn_ratio=0.25, deform_ratio=0.5, with_cffn=True,
        interact_attn_type='normal', interaction_drop_path_rate=0.4, model_cls="2branch_mix",
        branch1=dict(model_type="clip_hf", img_size=64, patch_size=16, pretrain_patch_size=14,
                     interaction_indexes=[[0, 0], [1, 1]], pretrained='pretrained/clip14', use_cls_token=True),
        branch2=dict(model_type="convnext_timm", img_size=64, interaction_indexes=[[0, 2], [3, 6]],
                     downsample_ratios=[4, 8, 8, 16, 16, 32, 32], pretrained="convnext_tiny_standin",
                     load_timm_weights=False),
    ),
    projector=dict(type="separate_2branch_v1", dim1=32, dim2=32, norm="ln"),
)
"""
CASE_A_BRANCHES = [
    {
        "backbone_config": clip_backbone(32, 2, 2, 56, 14),
        "image_size": 64,
        "interaction_groups": [[0, 0], [1, 1]],
        "patch_size": 16,
        "patch_stride": 14,  # the official convolution keeps the pretrained stride when its kernel is resampled
        "pretrain_grid_size": 4,
        "use_cls_token": True,
    },
    {
        "backbone_config": {
            "model_type": "convnext",
            "depths": [1, 1, 1, 1],
            "hidden_sizes": [8, 16, 24, 32],
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
            "layer_scale_init_value": 1e-6,
            "drop_path_rate": 0.0,
        },
        "image_size": 64,
        "interaction_groups": [[0, 2], [3, 6]],
    },
]

# Case B: two CLIP branches, deformable attention, GroupNorm projector, sharded safetensors;
# branch 2's pretrained model is unknown and absent, so its architecture comes from the tensor
# shapes plus a heads override.
CASE_B_PYTHON = """
model = dict(
    backbone=dict(
        n_points=2, deform_num_heads=4, cffn_ratio=0.25, deform_ratio=0.5, with_cffn=True,
        interact_attn_type='deform', interaction_drop_path_rate=0.4, model_cls="2branch_v1",
        branch1=dict(model_type="clip_hf", img_size=32, patch_size=16, pretrain_patch_size=16,
                     interaction_indexes=[[0, 1], [2, 2]], pretrained='pretrained/clip16', use_cls_token=True),
        branch2=dict(model_type="clip_hf", img_size=64, patch_size=16, pretrain_patch_size=16,
                     interaction_indexes=[[0, 0], [1, 1]], pretrained='someone/unknown-clip', use_cls_token=True),
    ),
    projector=dict(type="separate_2branch_v1", dim1=48, dim2=32, norm="gn"),
)
"""
CASE_B_BRANCHES = [
    {
        "backbone_config": clip_backbone(48, 3, 4, 32, 16),
        "image_size": 32,
        "interaction_groups": [[0, 1], [2, 2]],
        "patch_size": 16,
        "pretrain_grid_size": 2,
        "use_cls_token": True,
    },
    {
        "backbone_config": clip_backbone(32, 2, 2, 48, 16),
        "image_size": 64,
        "interaction_groups": [[0, 0], [1, 1]],
        "patch_size": 16,
        "pretrain_grid_size": 3,
        "use_cls_token": True,
    },
]


def case_config(branches, attention, heads, points, projector_norm) -> PIIPLlavaConfig:
    vision = {
        "branches": branches,
        "interaction_attention": attention,
        "deform_num_heads": heads,
        "deform_num_points": points,
        "deform_ratio": 0.5,
        "with_cffn": True,
        "cffn_ratio": 0.25,
        "interaction_drop_path_rate": 0.4,
    }
    return PIIPLlavaConfig(
        vision_config=vision,
        text_config={"model_type": "llama", **LLM},
        image_token_index=VOCAB,
        projector_norm=projector_norm,
        projector_num_groups=32,
    )


@pytest.fixture(scope="module")
def case_a(tmp_path_factory):
    src = tmp_path_factory.mktemp("released_a")
    config = case_config(CASE_A_BRANCHES, "normal", 2, 4, "layer_norm")
    reference, official = write_standin(src, config, CASE_A_PYTHON, ["clip", "convnext"], "gamma", "bin")
    os.makedirs(src / "pretrained" / "clip14")
    local = {**clip_backbone(32, 2, 2, 56, 14), "architectures": ["CLIPVisionModel"], "projection_dim": 16}
    (src / "pretrained" / "clip14" / "config.json").write_text(json.dumps(local))
    return src, config, reference, official


@pytest.fixture(scope="module")
def case_b(tmp_path_factory):
    src = tmp_path_factory.mktemp("released_b")
    config = case_config(CASE_B_BRANCHES, "deform", 4, 2, "group_norm")
    reference, official = write_standin(src, config, CASE_B_PYTHON, ["clip", "clip"], "weight", "safetensors", seed=1)
    os.makedirs(src / "pretrained" / "clip16")
    (src / "pretrained" / "clip16" / "config.json").write_text(json.dumps(clip_backbone(48, 3, 4, 32, 16)))
    return src, config, reference, official


def check_converted(dst, config: PIIPLlavaConfig, reference: dict) -> PIIPLlavaForConditionalGeneration:
    model, info = PIIPLlavaForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.vision_config.branches == PIIPLlavaConfig(**config.to_dict()).vision_config.branches
    state = model.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        if name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            assert state[name].shape[0] == VOCAB + 1
            torch.testing.assert_close(state[name][:VOCAB], tensor, rtol=0, atol=0)
            torch.testing.assert_close(state[name][VOCAB], tensor.mean(dim=0), rtol=0, atol=1e-7)
        else:
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=f"{name} differs")
    return model


def test_bin_clip_convnext_normal_attention_layer_norm_projector(case_a, tmp_path):
    src, config, reference, _ = case_a
    report = convert_released_checkpoint(src, tmp_path / "out")
    model = check_converted(tmp_path / "out", config, reference)
    assert model.config.vision_config.interaction_attention == "normal"
    assert model.config.projector_norm == "layer_norm"
    branch = model.config.vision_config.branches[0]
    assert (branch.patch_size, branch.patch_stride, branch.pretrain_grid_size, branch.backbone_config.patch_size) == (
        16, 14, 4, 14
    )
    assert report.architecture_sources["branch1"].startswith("local config")
    assert report.architecture_sources["branch2"] == "tensor shapes"
    assert sorted(report.filled) == [
        f"model.multi_modal_projector.branches.{b}.norm.{kind}" for b in (0, 1) for kind in ("bias", "weight")
    ]
    assert any(name.endswith("convnext_model.head.fc.weight") for name in report.dropped_expected_unused)
    assert any(name.endswith("clip_model.post_layernorm.weight") for name in report.dropped_expected_unused)
    assert report.unused == [] and report.missing == []
    saved = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert saved["image_token_index"] == VOCAB and saved["vocab_size"] == VOCAB + 1


def test_sharded_safetensors_two_clips_deform_shapes_and_override(case_b, tmp_path):
    src, config, reference, _ = case_b
    report = convert_released_checkpoint(
        src, tmp_path / "out", branch_overrides={2: {"num_attention_heads": 2}}, max_shard_size=20_000
    )
    check_converted(tmp_path / "out", config, reference)
    assert report.architecture_sources["branch2"].startswith("tensor shapes")
    assert report.branch_overrides == {"branch2": {"num_attention_heads": 2}}
    assert len([name for name in os.listdir(tmp_path / "out") if name.endswith(".safetensors")]) > 1
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_logits_over_original_vocabulary_unchanged_and_image_token_never_generated(case_b, tmp_path):
    src, config, reference, _ = case_b
    convert_released_checkpoint(src, tmp_path / "out", branch_overrides={2: {"num_attention_heads": 2}})
    converted = PIIPLlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    original = PIIPLlavaForConditionalGeneration(config).eval()
    original.load_state_dict(reference)
    input_ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(
            converted(input_ids=input_ids).logits[..., :VOCAB], original(input_ids=input_ids).logits
        )
        # Make <image> the model's favourite next token: generation must still never produce it.
        final_hidden = converted.model(input_ids=input_ids).last_hidden_state[0, -1]
        converted.lm_head.weight[VOCAB] = final_hidden * 100
        favourite = converted(input_ids=input_ids).logits[0, -1].argmax().item()
    assert favourite == VOCAB
    assert converted.generation_config.suppress_tokens == [VOCAB]
    generated = converted.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert VOCAB not in generated[0, input_ids.shape[1] :].tolist()


def test_unused_and_missing_keys_fail_unless_allowed(case_b, tmp_path):
    src, _, _, _ = case_b
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    # Drop one tensor from the index and add an unknown one in a new shard.
    dropped = "model.vision_tower.vision_tower.interactions.0.interaction_units_12.branch2to1_injector.ca_weight"
    index["weight_map"].pop(dropped)
    save_file({"model.mystery.weight": torch.zeros(2)}, broken / "extra.safetensors")
    index["weight_map"]["model.mystery.weight"] = "extra.safetensors"
    for shard in {file for file in index["weight_map"].values() if file != "extra.safetensors"}:
        from safetensors.torch import load_file

        tensors = {k: v for k, v in load_file(broken / shard).items() if k != dropped}
        save_file(tensors, broken / shard)
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    overrides = {2: {"num_attention_heads": 2}}
    with pytest.raises(ConversionError, match="map to nothing.*model.mystery.weight"):
        convert_released_checkpoint(broken, tmp_path / "a", branch_overrides=overrides)
    with pytest.raises(ConversionError, match="get no tensor.*injector_into_a.attn_gate"):
        convert_released_checkpoint(broken, tmp_path / "b", branch_overrides=overrides, allow_unused=True)
    report = convert_released_checkpoint(
        broken, tmp_path / "c", branch_overrides=overrides, allow_unused=True, allow_missing=True
    )
    assert report.unused == ["model.mystery.weight"]
    assert report.missing == ["model.vision_tower.interactions.0.units.0.injector_into_a.attn_gate"]


def test_wrong_architecture_is_refused_with_the_reason(case_b, tmp_path):
    src, _, _, _ = case_b
    with pytest.raises(ConversionError, match="hidden size 32 is not divisible by 3 heads"):
        convert_released_checkpoint(src, tmp_path / "out", branch_overrides={2: {"num_attention_heads": 3}})
    with pytest.raises(ConversionError, match="num_hidden_layers is 5 in the config but 2 in the weights"):
        convert_released_checkpoint(src, tmp_path / "out", branch_overrides={2: {"num_hidden_layers": 5}})


def test_cli_parses_overrides_and_converts(case_b, tmp_path, capsys):
    import argparse

    assert parse_branch_override("2:num_attention_heads=12") == (2, "num_attention_heads", 12)
    assert parse_branch_override("1:hidden_act=gelu") == (1, "hidden_act", "gelu")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    src, config, reference, _ = case_b
    args = parser.parse_args(
        ["convert", "--src", str(src), "--dst", str(tmp_path / "out"), "--branch-override", "2:num_attention_heads=2"]
    )
    assert args.handler(args) == 0
    assert "Converted" in capsys.readouterr().out
    check_converted(tmp_path / "out", config, reference)
    args = parser.parse_args(["convert", "--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "bad")])
    assert args.handler(args) == 1
    assert "has no config.json" in capsys.readouterr().err


def folder_contents(directory) -> dict:
    """{relative path: bytes} of every file under `directory`."""
    return {
        os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(directory) for name in names
    }


def convert_cli(*arguments) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["convert", *map(str, arguments), "--branch-override", "2:num_attention_heads=2"])
    return args.handler(args)


def test_convert_never_writes_into_or_around_its_source(case_b, tmp_path, capsys):
    source = tmp_path / "released"
    shutil.copytree(case_b[0], source)
    before = folder_contents(source)
    for destination in (source, source / "converted", tmp_path):
        assert convert_cli("--src", source, "--dst", destination) == 1
        assert "Choose a directory outside the source" in capsys.readouterr().err
    assert folder_contents(source) == before
    assert sorted(os.listdir(tmp_path)) == ["released"]


def test_convert_replaces_a_non_empty_destination_only_when_asked(case_b, tmp_path, capsys):
    src, config, reference, _ = case_b
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "model.safetensors").write_bytes(b"stale weights of another model")
    (destination / "notes.txt").write_text("mine")
    before = folder_contents(destination)
    assert convert_cli("--src", src, "--dst", destination) == 1
    assert "is not empty; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert folder_contents(destination) == before
    # A conversion that fails half-way leaves the destination as it was, and no staging folder behind.
    with pytest.raises(ConversionError):
        convert_released_checkpoint(src, destination, overwrite=True, branch_overrides={2: {"num_hidden_layers": 5}})
    assert folder_contents(destination) == before and sorted(os.listdir(tmp_path)) == ["out"]
    assert convert_cli("--src", src, "--dst", destination, "--overwrite") == 0
    assert "notes.txt" not in os.listdir(destination)
    check_converted(destination, config, reference)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_convert_shows_its_progress_over_the_checkpoint_tensors(case_b, tmp_path, capsys):
    src = case_b[0]
    assert convert_cli("--src", src, "--dst", tmp_path / "out") == 0
    tensor_count = len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
    assert re.search(rf"Converting: 100%.*{tensor_count}/{tensor_count}", capsys.readouterr().err)
