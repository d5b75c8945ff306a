"""Exact parity with the official PIIP perception code on the toy models it wrote itself.

Each fixture in `fixtures/official-piip-perception/` holds the official `config.py`, the official
state dict and the official outputs for its `pixel_values` (see its `case.json`). The test converts
the directory with `piip-llava convert`, loads the result through transformers and compares in
fp32 on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageClassification

from piip_llava import PIIPBackbone
from piip_llava.cli import main

FIXTURES = Path(__file__).parents[1] / "fixtures" / "official-piip-perception"
# More official configurations, written by the official classification code run locally (see its README).
LOCAL_FIXTURES = Path(__file__).parents[1] / "fixtures" / "official-piip-perception-local"
TOLERANCE = 1e-5


def convert(case: str, destination: Path) -> Path:
    assert main(["convert", "--src", str(FIXTURES / case), "--dst", str(destination)]) == 0
    return destination


def test_classifier_logits_equal_the_official_ones(tmp_path):
    converted = convert("cls_3branch_tsb_deform", tmp_path / "cls")
    reference = load_file(FIXTURES / "cls_3branch_tsb_deform" / "official_outputs.safetensors")
    case = json.loads((FIXTURES / "cls_3branch_tsb_deform" / "case.json").read_text())
    model = AutoModelForImageClassification.from_pretrained(converted).eval()
    assert sum(parameter.numel() for parameter in model.parameters()) == case["param_count"]
    with torch.no_grad():
        logits = model(reference["pixel_values"]).logits
    assert logits.shape == reference["logits"].shape
    torch.testing.assert_close(logits, reference["logits"], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "case",
    ["cls_2branch_shared_augreg_normal", "cls_3branch_shared_augreg_rms_qknorm", "cls_4branch_separate_deit_noproj"],
)
def test_more_official_classifiers_give_the_official_logits(tmp_path, case):
    """2 and 4 branches, the shared head, AugReg / InternViT blocks (RMSNorm, qk-norm, layer scale),
    plain-attention interactions and interactions without projections."""
    assert main(["convert", "--src", str(LOCAL_FIXTURES / case), "--dst", str(tmp_path)]) == 0
    reference = load_file(LOCAL_FIXTURES / case / "official_outputs.safetensors")
    model = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        logits = model(reference["pixel_values"]).logits
    torch.testing.assert_close(logits, reference["logits"], atol=TOLERANCE, rtol=0)


def test_detection_backbone_maps_equal_the_official_ones(tmp_path):
    converted = convert("det_3branch_backbone", tmp_path / "det")
    reference = load_file(FIXTURES / "det_3branch_backbone" / "official_outputs.safetensors")
    case = json.loads((FIXTURES / "det_3branch_backbone" / "case.json").read_text())
    assert AutoConfig.from_pretrained(converted).out_features == ["fpn1", "fpn2", "fpn3", "fpn4"]
    model = PIIPBackbone.from_pretrained(converted).eval()
    assert sum(parameter.numel() for parameter in model.parameters()) == case["param_count"]
    with torch.no_grad():
        feature_maps = model(reference["pixel_values"]).feature_maps
    assert len(feature_maps) == 4
    for index, feature_map in enumerate(feature_maps):
        torch.testing.assert_close(feature_map, reference[f"f{index}"], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "case",
    [
        "det_2branch_internvit_dino_windows_padded",
        "det_4branch_deit_windows_padded_qkv",
        "seg_3branch_input_branch2_no_pos_resize",
        "det_3branch_convnext_cnn_last_intermediate_merge",
        "det_3branch_convnext_vit_last_intermediate_merge",
        "det_3branch_beit_windows_padded",
        "det_3branch_uniperceiver_windows_padded",
    ],
)
def test_more_official_detection_backbones_give_the_official_maps(tmp_path, case):
    """2 and 4 branches, InternViT branches, DINO outputs, windows that need padding (both
    semantics), interactions without projections or norms, the 4-branch quirk, the mmseg
    3-branch convention (input at branch 2's size, branch 3 upsampled, positions added as stored),
    ConvNeXt branches with the intermediate merges (`with_simple_fpn=False`) after a ConvNeXt
    or a ViT last branch, BEiT branches (relative position biases over windows that need padding) and
    Uni-Perceiver branches (their own embedding, LayerNorm eps 1e-5)."""
    assert main(["convert", "--src", str(LOCAL_FIXTURES / case), "--dst", str(tmp_path)]) == 0
    reference = load_file(LOCAL_FIXTURES / case / "official_outputs.safetensors")
    model = PIIPBackbone.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        feature_maps = model(reference["pixel_values"]).feature_maps
    expected = [reference[name] for name in sorted(name for name in reference if name.startswith("f"))]
    assert len(feature_maps) == len(expected)
    for feature_map, official in zip(feature_maps, expected):
        torch.testing.assert_close(feature_map, official, atol=TOLERANCE, rtol=0)


def test_official_pth_checkpoints_convert_like_safetensors(tmp_path):
    """Classification saves {"model": state_dict}; mmdet {"state_dict": ...} with a backbone. prefix
    beside the neck's tensors, which are dropped."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.py").write_text((FIXTURES / "det_3branch_backbone" / "config.py").read_text())
    state = load_file(FIXTURES / "det_3branch_backbone" / "model.safetensors")
    detector_state = {f"backbone.{name}": tensor for name, tensor in state.items()}
    detector_state["neck.lateral_convs.0.conv.weight"] = torch.zeros(4, 96, 1, 1)
    torch.save({"state_dict": detector_state, "meta": {"epoch": 12}}, source / "mask_rcnn.pth")
    converted = convert_from(source, tmp_path / "dst")
    reference = load_file(FIXTURES / "det_3branch_backbone" / "official_outputs.safetensors")
    model = PIIPBackbone.from_pretrained(converted).eval()
    with torch.no_grad():
        first = model(reference["pixel_values"]).feature_maps[0]
    torch.testing.assert_close(first, reference["f0"], atol=TOLERANCE, rtol=0)
    report = json.loads((converted / "conversion_report.json").read_text())
    assert report["dropped"] == ["neck.lateral_convs.0.conv.weight"]


def test_classification_pth_with_its_training_args_converts(tmp_path):
    """classification/main.py saves {"model": ..., "args": argparse.Namespace, "epoch": ...}."""
    import argparse

    source = tmp_path / "src"
    source.mkdir()
    (source / "config.py").write_text((FIXTURES / "cls_3branch_tsb_deform" / "config.py").read_text())
    state = load_file(FIXTURES / "cls_3branch_tsb_deform" / "model.safetensors")
    args = argparse.Namespace(lr=5e-4, input_size=144, model="piip_3branch")
    torch.save({"model": state, "args": args, "epoch": 299}, source / "checkpoint.pth")
    converted = convert_from(source, tmp_path / "dst")
    reference = load_file(FIXTURES / "cls_3branch_tsb_deform" / "official_outputs.safetensors")
    with torch.no_grad():
        logits = AutoModelForImageClassification.from_pretrained(converted).eval()(reference["pixel_values"]).logits
    torch.testing.assert_close(logits, reference["logits"], atol=TOLERANCE, rtol=0)


def convert_from(source: Path, destination: Path) -> Path:
    assert main(["convert", "--src", str(source), "--dst", str(destination)]) == 0
    return destination


@pytest.mark.parametrize(
    "damage, message",
    [
        ("drop", "lacks 1 tensor"),
        ("reshape", "has shape (1, 49, 95)"),
    ],
)
def test_damaged_checkpoints_are_refused_with_the_tensor_named(tmp_path, capsys, damage, message):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.py").write_text((FIXTURES / "det_3branch_backbone" / "config.py").read_text())
    state = load_file(FIXTURES / "det_3branch_backbone" / "model.safetensors")
    if damage == "drop":
        del state["branch2.blocks.1.mlp.fc1.weight"]
    else:
        state["branch1.pos_embed"] = state["branch1.pos_embed"][..., :95]
    torch.save({"state_dict": state}, source / "checkpoint.pth")
    assert main(["convert", "--src", str(source), "--dst", str(tmp_path / "dst")]) == 1
    printed = capsys.readouterr().err
    assert message in printed
    assert ("branches.1.layers.1.mlp.fc1.weight" if damage == "drop" else "position_embedding") in printed
    assert not (tmp_path / "dst" / "config.json").exists()


def test_conversion_never_writes_into_its_source_or_a_non_empty_destination(tmp_path, capsys):
    source = tmp_path / "official"
    source.mkdir()
    for name in ("config.py", "model.safetensors"):
        (source / name).write_bytes((FIXTURES / "cls_3branch_tsb_deform" / name).read_bytes())
    before = {path.name: path.read_bytes() for path in source.iterdir()}
    assert main(["convert", "--src", str(source), "--dst", str(source)]) == 1
    assert "is the source checkpoint" in capsys.readouterr().err
    assert main(["convert", "--src", str(source), "--dst", str(source / "converted")]) == 1
    assert {path.name: path.read_bytes() for path in source.iterdir()} == before

    destination = tmp_path / "converted"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")
    assert main(["convert", "--src", str(source), "--dst", str(destination)]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert (destination / "notes.txt").read_text() == "mine"
    assert main(["convert", "--src", str(source), "--dst", str(destination), "--overwrite"]) == 0
    assert (destination / "config.json").is_file() and not (destination / "notes.txt").exists()
