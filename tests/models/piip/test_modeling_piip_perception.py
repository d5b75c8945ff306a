"""PIIP perception models: heads, dense outputs, windows, input conventions, errors, transformers integration."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, ConvNextConfig, ConvNextModel, pipeline

from piip_llava import PIIPBackbone, PIIPForImageClassification, PIIPPerceptionConfig
from piip_llava.cli import main
from piip_llava.models.piip.modeling_piip_perception import PIIPPerceptionModel, windowed_attention

FIXTURES = Path(__file__).parents[2] / "fixtures" / "official-piip-perception"


def branch(image_size, width, heads, layers=2, **options):
    grid = options.pop("position_grid", image_size // 16)
    return {
        "image_size": image_size, "hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": heads,
        "position_grid": grid, "interaction_groups": [[index, index] for index in range(layers)], **options,
    }  # fmt: skip


TINY_CONVNEXT = {"depths": [1, 1, 1, 1], "hidden_sizes": [32, 64, 96, 128]}  # merged widths: GroupNorm(32)
CONVNEXT_GROUPS = [[0, 0], [1, 2], [3, 4], [5, 6]]  # blocks: layer | down, layer | down, layer | down, layer


def convnext_branch(image_size):
    return {"branch_type": "convnext", "image_size": image_size, "convnext_config": TINY_CONVNEXT,
            "interaction_groups": CONVNEXT_GROUPS}  # fmt: skip


def vit_branch_in_four_groups(image_size, width, heads):
    return branch(image_size, width, heads, layers=4)


def regular_fpn_config(last_is_convnext: bool) -> PIIPPerceptionConfig:
    """3 branches with a ConvNeXt, merged after interactions 0, 1, 2 and at the end (`with_simple_fpn=False`)."""
    if last_is_convnext:
        branches = [vit_branch_in_four_groups(32, 64, 2), vit_branch_in_four_groups(64, 32, 1), convnext_branch(128)]
    else:
        branches = [convnext_branch(64), vit_branch_in_four_groups(64, 32, 1), vit_branch_in_four_groups(128, 32, 1)]
    return tiny_config(branches=branches, resize_position_embeddings=True, with_simple_fpn=False, out_interaction_indexes=[0, 1, 2])


def tiny_config(**options) -> PIIPPerceptionConfig:
    branches = options.pop("branches", [branch(32, 64, 2), branch(48, 32, 1), branch(64, 32, 1)])
    return PIIPPerceptionConfig(branches=branches, num_labels=5, deform_num_heads=2, **options)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (zero gates and unit layer scales would hide most of the computation)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


# ----- heads -------------------------------------------------------------------------------------------
def test_separate_heads_average_each_branch_head_on_its_top_left_patch_token():
    config = tiny_config(branches=[branch(32, 64, 2, use_cls_token=True), branch(64, 32, 1, use_cls_token=True)])
    model = randomise(PIIPForImageClassification(config))
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs = model.piip(pixel_values)
        expected = torch.stack(
            [
                classifier(norm(feature_map[:, :, 0, 0]))  # patch token (0, 0), not the class token
                for feature_map, norm, classifier in zip(outputs.feature_maps, model.branch_norms, model.branch_classifiers)
            ]
        ).mean(0)
        logits = model(pixel_values).logits
    torch.testing.assert_close(logits, expected)
    assert all(token is not None for token in outputs.class_tokens)
    torch.testing.assert_close(outputs.last_hidden_state, outputs.feature_maps[-1].flatten(2).transpose(1, 2))


def test_shared_head_merges_resizes_weights_then_averages_tokens():
    model = randomise(PIIPForImageClassification(tiny_config(classification_head="shared")))
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.piip(pixel_values).feature_maps
        merged = 0
        for index, feature_map in enumerate(maps):
            merge = model.branch_merges[index]
            if index == 0:
                feature_map = merge(feature_map)  # a bare GroupNorm for branch 1
            else:
                feature_map = merge.norm_in(feature_map)
                feature_map = torch.einsum("bchw,oc->bohw", feature_map, merge.proj.weight) + merge.proj.bias[:, None, None]
                feature_map = merge.norm_out(feature_map)
            feature_map = F.interpolate(feature_map, size=maps[-1].shape[-2:], mode="bilinear", align_corners=False)
            merged = merged + feature_map * model.merge_weights.weights[index]
        tokens = F.layer_norm(merged.flatten(2).transpose(1, 2), (64,), model.merged_norm.weight, model.merged_norm.bias, 1e-6)
        expected = model.classifier(tokens.mean(1))
        logits = model(pixel_values).logits
    torch.testing.assert_close(logits, expected)


# ----- dense backbone ---------------------------------------------------------------------------------
def test_backbone_scales_and_dino_outputs():
    config = tiny_config(resize_position_embeddings=True, branches=[branch(32, 64, 2), branch(64, 32, 1)])
    model = randomise(PIIPBackbone(config))
    pixel_values = torch.randn(1, 3, 96, 80)  # any size: positions are resized per forward
    with torch.no_grad():
        maps = model(pixel_values).feature_maps
    assert [tuple(feature_map.shape) for feature_map in maps] == [(1, 64, 24, 20), (1, 64, 12, 10), (1, 64, 6, 5), (1, 64, 3, 2)]
    assert model.channels == [64, 64, 64, 64]

    config.out_features = ["fpn2", "fpn3", "fpn4"]
    with torch.no_grad():
        dino_maps = model(pixel_values).feature_maps
    assert len(dino_maps) == 3
    for dino_map, full_map in zip(dino_maps, maps[1:]):
        torch.testing.assert_close(dino_map, full_map)

    without_fpn1 = PIIPPerceptionConfig.from_dict({**config.to_dict(), "build_fpn1": False, "out_features": None})
    assert without_fpn1.out_features == ["fpn2", "fpn3", "fpn4"]
    assert not any(name.startswith("upsample_4x") for name, _ in PIIPBackbone(without_fpn1).named_parameters())


def test_convnext_branches_are_transformers_convnext_when_the_interactions_are_zero_gated():
    """A ConvNeXt branch computes what transformers' ConvNextModel computes on its image, stage by stage."""
    config = regular_fpn_config(last_is_convnext=True)
    model = PIIPPerceptionModel(config).eval()
    convnext = ConvNextModel(ConvNextConfig(**TINY_CONVNEXT)).eval()
    convnext.embeddings.load_state_dict(model.branches[2].embeddings.state_dict())
    convnext.encoder.stages.load_state_dict(model.branches[2].stages.state_dict())
    pixel_values = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        outputs = model(pixel_values)
        stages = convnext(pixel_values, output_hidden_states=True).hidden_states[1:]
    torch.testing.assert_close(outputs.feature_maps[2], stages[-1])
    for maps_after_interaction, stage in zip(outputs.interaction_feature_maps, stages):
        torch.testing.assert_close(maps_after_interaction[2], stage)


@pytest.mark.parametrize("last_is_convnext", [True, False])
def test_intermediate_merges_give_the_four_outputs(last_is_convnext):
    """Without the simple FPN: the maps after interactions 0, 1, 2 and the final ones, each merged at the last
    branch's grid; as they are after a ConvNeXt last branch, else up-sampled 4x / 2x and max-pooled."""
    model = randomise(PIIPBackbone(regular_fpn_config(last_is_convnext)))
    pixel_values = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        outputs = model.piip(pixel_values)
        levels = [merge(maps) for merge, maps in zip(model.intermediate_merges, outputs.interaction_feature_maps)]
        final = model.merge_weights([merge(feature_map) for merge, feature_map in zip(model.branch_merges, outputs.feature_maps)])
        maps = model(pixel_values).feature_maps
    if last_is_convnext:
        expected = levels + [final]
        assert [tuple(feature_map.shape[1:]) for feature_map in maps] == [(64, 32, 24), (64, 16, 12), (64, 8, 6), (64, 4, 3)]
    else:
        expected = [model.upsample_4x(levels[0]), model.upsample_2x(levels[1]), levels[2], F.max_pool2d(final, 2)]
        # Branch 1 (the ConvNeXt) is 32, 64, 96 wide after interactions 0, 1, 2 and 128 at the end.
        assert [tuple(feature_map.shape[1:]) for feature_map in maps] == [(32, 32, 24), (64, 16, 12), (96, 8, 6), (128, 4, 3)]
    assert model.channels == [feature_map.shape[1] for feature_map in maps]
    for feature_map, reference in zip(maps, expected):
        torch.testing.assert_close(feature_map, reference)
    # The merged map of the last branch's grid: branch 1 normed, the others convolved, weighted sum.
    first, second, third = outputs.interaction_feature_maps[0]
    merge = model.intermediate_merges[0]

    def resize(feature_map):
        return F.interpolate(feature_map, size=third.shape[-2:], mode="bilinear", align_corners=False)

    weights = merge.merge_weights.weights
    by_hand = (
        resize(F.relu(merge.branch_merges[0][0](first))) * weights[0]
        + resize(merge.branch_merges[1](second)) * weights[1]
        + merge.branch_merges[2](third) * weights[2]
    )
    torch.testing.assert_close(levels[0], by_hand)


def test_convnext_configs_that_cannot_work_are_refused_by_name():
    convnext_last = [vit_branch_in_four_groups(32, 64, 2), convnext_branch(128)]
    with pytest.raises(ValueError, match="with_simple_fpn needs a ViT last branch"):
        tiny_config(branches=convnext_last, resize_position_embeddings=True)
    with pytest.raises(ValueError, match=r"three increasing out_interaction_indexes among the 4 interactions, got \[0, 2, 1\]"):
        tiny_config(branches=convnext_last, with_simple_fpn=False, out_interaction_indexes=[0, 2, 1])
    with pytest.raises(ValueError, match="Branch 2: interaction groups .* cover layers 0..5 of 7"):
        tiny_config(branches=[vit_branch_in_four_groups(32, 64, 2), {**convnext_branch(128), "interaction_groups": [[0, 0], [1, 2], [3, 4], [5, 5]]}],
                    with_simple_fpn=False, out_interaction_indexes=[0, 1, 2])  # fmt: skip
    with pytest.raises(ValueError, match="official classifiers have ViT branches only"):
        PIIPForImageClassification(regular_fpn_config(last_is_convnext=False))
    backbone = PIIPBackbone(regular_fpn_config(last_is_convnext=False))  # branch 1: a ConvNeXt at half the input
    with pytest.raises(ValueError, match="Branch 1 \\(ConvNeXt\\) gets a 16x48 image .* smaller than its total stride 32"):
        backbone(torch.randn(1, 3, 32, 96))


def test_convnext_backbone_round_trip(tmp_path):
    model = randomise(PIIPBackbone(regular_fpn_config(last_is_convnext=False)))
    model.save_pretrained(tmp_path)
    reloaded = PIIPBackbone.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        for original, loaded in zip(model(pixel_values).feature_maps, reloaded(pixel_values).feature_maps):
            torch.testing.assert_close(original, loaded)


OFFLINE_LOADING = """
import sys
import torch
from transformers import AutoBackbone, AutoConfig, AutoModelForImageClassification
import piip_llava
classifier_dir, backbone_dir = sys.argv[1:]
classifier = AutoModelForImageClassification.from_pretrained(classifier_dir)
backbone = AutoBackbone.from_config(AutoConfig.from_pretrained(backbone_dir))
backbone.load_state_dict(type(backbone).from_pretrained(backbone_dir).state_dict())
print(type(classifier).__name__, type(backbone).__name__)
try:
    AutoBackbone.from_pretrained(backbone_dir)
except Exception as error:
    print("AutoBackbone.from_pretrained:", type(error).__name__)
"""


def test_saved_models_load_offline_through_the_auto_classes(tmp_path):
    """HF_HUB_OFFLINE=1: AutoModelForImageClassification.from_pretrained takes a local directory, and a backbone
    loads through AutoConfig + AutoBackbone.from_config (what transformers' `load_backbone` does). The installed
    transformers' AutoBackbone.from_pretrained asks the Hub whether any name is a repository before loading, a
    local directory included (its own Dinov2Backbone too), so it fails offline: not something our classes decide."""
    PIIPForImageClassification(tiny_config()).save_pretrained(tmp_path / "classifier")
    PIIPBackbone(tiny_config(resize_position_embeddings=True)).save_pretrained(tmp_path / "backbone")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOADING, str(tmp_path / "classifier"), str(tmp_path / "backbone")],
        capture_output=True, text=True, env=environment, timeout=300, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0] == "PIIPForImageClassification PIIPBackbone"
    assert lines[1] == "AutoBackbone.from_pretrained: HFValidationError"


def test_autobackbone_builds_the_backbone_from_its_config():
    backbone = AutoBackbone.from_config(tiny_config(resize_position_embeddings=True))
    assert isinstance(backbone, PIIPBackbone)
    assert backbone.out_features == ["fpn1", "fpn2", "fpn3", "fpn4"]


def test_mmseg_three_branch_input_is_branch_two_image_and_branch_three_is_upsampled():
    config = tiny_config(input_branch=1)
    model = PIIPPerceptionModel(config).eval()
    pixel_values = torch.randn(1, 3, 48, 48)
    images = model.resize_for_branches(pixel_values)
    assert [tuple(image.shape[-2:]) for image in images] == [(32, 32), (48, 48), (64, 64)]
    torch.testing.assert_close(images[2], F.interpolate(pixel_values, scale_factor=64 / 48, mode="bilinear"))
    assert images[1] is pixel_values
    with pytest.raises(ValueError, match="takes 48x48 images"):
        model(torch.randn(1, 3, 64, 64))


def test_branch_images_use_scale_factor_like_the_official_code():
    """With `scale_factor`, PyTorch floors the size and maps coordinates with the factor itself."""
    config = tiny_config(resize_position_embeddings=True, branches=[branch(48, 64, 2), branch(160, 32, 1)])
    model = PIIPPerceptionModel(config)
    pixel_values = torch.randn(1, 3, 160, 112)
    small = model.resize_for_branches(pixel_values)[0]
    assert tuple(small.shape[-2:]) == (48, 33)
    by_size = F.interpolate(pixel_values, size=(48, 33), mode="bilinear", align_corners=False)
    assert not torch.allclose(small, by_size)
    torch.testing.assert_close(small, F.interpolate(pixel_values, scale_factor=0.3, mode="bilinear"))


# ----- windows -------------------------------------------------------------------------------------------
def reference_windows(attention, normed, grid, window, padding):
    """Window attention written out window by window, padding as the official code does."""
    batch, _, channels = normed.shape
    height, width = grid
    padded_h, padded_w = math.ceil(height / window) * window, math.ceil(width / window) * window
    heads = attention.num_attention_heads
    tokens = normed.view(batch, height, width, channels)

    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    if padding == "tokens":
        tokens = F.pad(tokens, (0, 0, 0, padded_w - width, 0, padded_h - height))
        q, k, v = (linear(tokens) for linear in projections)
    else:
        q, k, v = (F.pad(linear(tokens), (0, 0, 0, padded_w - width, 0, padded_h - height)) for linear in projections)

    def cut(tensor, top, left):
        part = tensor[:, top : top + window, left : left + window].reshape(batch, -1, heads, channels // heads)
        return part.transpose(1, 2)  # (batch, heads, window^2, head_dim)

    out = torch.zeros(batch, padded_h, padded_w, channels)
    for top in range(0, padded_h, window):
        for left in range(0, padded_w, window):
            scores = cut(q, top, left) @ cut(k, top, left).transpose(-1, -2) * attention.scaling
            attended = scores.softmax(-1) @ cut(v, top, left)
            attended = attended.transpose(1, 2).reshape(batch, window, window, channels)
            out[:, top : top + window, left : left + window] = attended
    return attention.o_proj(out[:, :height, :width].reshape(batch, height * width, channels))


@pytest.mark.parametrize("padding", ["tokens", "qkv"])
def test_windowed_attention_pads_as_the_official_paths_do(padding):
    config = tiny_config(branches=[branch(32, 64, 2), branch(64, 32, 2, window_sizes=[3, 3], window_padding=padding)])
    attention = randomise(PIIPPerceptionModel(config)).branches[1].layers[0].attention
    normed = torch.randn(2, 4 * 5, 32)  # a 4 x 5 grid: both sides padded to 6
    with torch.no_grad():
        ours = windowed_attention(attention, normed, (4, 5), 3, padding)
        expected = reference_windows(attention, normed, (4, 5), 3, padding)
        other = reference_windows(attention, normed, (4, 5), 3, "qkv" if padding == "tokens" else "tokens")
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, other, atol=1e-4)  # the two official paths differ on padded windows


def test_internvit_branches_run_with_rmsnorm_qk_norm_and_tanh_gelu():
    internvit = branch(64, 32, 2, branch_type="internvit", norm_type="rms_norm", qk_norm=True,
                       hidden_act="gelu_pytorch_tanh", position_class_slot=True, window_sizes=[3, None])  # fmt: skip
    config = tiny_config(resize_position_embeddings=True, branches=[branch(32, 64, 2), internvit])
    model = randomise(PIIPBackbone(config))
    layer = model.piip.branches[1].layers[0]
    assert type(layer).__name__ == "InternVLVisionLayer"
    assert type(layer.attention.q_norm).__name__ == "InternVLVisionRMSNorm" and layer.attention.q_norm.weight.shape == (32,)
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64)).feature_maps
    assert all(torch.isfinite(feature_map).all() for feature_map in maps)


# ----- inputs, errors, integration ----------------------------------------------------------------------
def test_images_the_model_cannot_take_are_refused_by_size():
    classifier = PIIPForImageClassification(tiny_config())
    with pytest.raises(ValueError, match="pixel_values are 60x64 but this model takes 64x64 images"):
        classifier(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        classifier(torch.randn(3, 64, 64))
    backbone = PIIPBackbone(tiny_config(resize_position_embeddings=True))
    with pytest.raises(ValueError, match="Branch 1 gets a 8x32 image .* smaller than one 16-pixel patch"):
        backbone(torch.randn(1, 3, 16, 64))
    same_size = PIIPBackbone(tiny_config(resize_position_embeddings=True, branches=[branch(64, 64, 2), branch(64, 32, 1)]))
    with pytest.raises(ValueError, match="gives a \\(1, 4\\) merged map, too small for the 1/2 output"):
        same_size(torch.randn(1, 3, 16, 64))


def test_invalid_configs_name_the_problem():
    with pytest.raises(ValueError, match="Branch 2: unknown keys \\['widht'\\]"):
        tiny_config(branches=[branch(32, 64, 2), {**branch(64, 32, 1), "widht": 3}])
    with pytest.raises(ValueError, match="Branch 1: branch_type must be one of"):
        tiny_config(branches=[branch(32, 64, 2, branch_type="swin"), branch(64, 32, 1)])
    with pytest.raises(ValueError, match="out_features asks for fpn1 but build_fpn1 is false"):
        tiny_config(build_fpn1=False, out_features=["fpn1"])


def test_save_load_round_trip_and_batching(tmp_path):
    model = randomise(PIIPForImageClassification(tiny_config()))
    model.save_pretrained(tmp_path)
    reloaded = PIIPForImageClassification.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        together = model(pixel_values).logits
        one_by_one = torch.cat([reloaded(image[None]).logits for image in pixel_values])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "piip_perception"


def test_zero_gated_interactions_leave_the_branches_as_they_are():
    """Freshly initialised interactions are the identity: each branch computes what it computes alone."""
    model = PIIPPerceptionModel(tiny_config()).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = model(pixel_values).feature_maps
        for branch_module, image, feature_map in zip(model.branches, model.resize_for_branches(pixel_values), maps):
            state = branch_module.run_blocks(branch_module.embed(image, 1), 0, 1)
            torch.testing.assert_close(state.feature_map(), feature_map)


def test_pipeline_classifies_with_the_converted_classifier_and_the_official_transform(tmp_path):
    assert main(["convert", "--src", str(FIXTURES / "cls_3branch_tsb_deform"), "--dst", str(tmp_path)]) == 0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8))

    # Official evaluation transform: shorter side to int(144 / 0.875) = 164 (bicubic), centre crop 144.
    resized = image.resize((273, 164), Image.BICUBIC)
    left, top = (273 - 144) // 2, (164 - 144) // 2
    cropped = np.asarray(resized.crop((left, top, left + 144, top + 144)), dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = torch.from_numpy(((cropped - mean) / std).transpose(2, 0, 1)).float()[None]
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    pixel_values = processor(image, return_tensors="pt").pixel_values
    torch.testing.assert_close(pixel_values, expected, atol=2e-2, rtol=0)  # PIL rounding of the resized bytes

    classifier = pipeline("image-classification", model=str(tmp_path), device="cpu")
    predictions = classifier(image, top_k=3)
    model = classifier.model
    with torch.no_grad():
        probabilities = model(pixel_values).logits.softmax(-1)[0]
    best = probabilities.argmax().item()
    assert predictions[0]["label"] == model.config.id2label[best]
    assert predictions[0]["score"] == pytest.approx(probabilities[best].item(), abs=1e-5)
    assert len(predictions) == 3
