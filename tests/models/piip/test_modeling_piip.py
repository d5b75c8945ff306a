"""PIIP vision encoder: zero-gated equivalence with the bare backbones, deformable attention, training, I/O."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    clip_convnext_branches,
    clip_resnet_branches,
    perturb_interactions,
    three_branches,
    tiny_clip_backbone,
    tiny_convnext_backbone,
    tiny_resnet_backbone,
    tiny_siglip_backbone,
    tiny_vision_config,
    two_clip_branches,
)
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    ResNetConfig,
    ResNetModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from piip_llava.models.piip import PIIPVisionConfig, PIIPVisionModel
from piip_llava.models.piip.interactions import DeformableCrossAttention, cell_centre_reference_points
from piip_llava.models.piip.pretrained_branches import resample_patch_kernel


def save_backbone(model_class, config_class, backbone: dict, directory) -> str:
    options = {key: value for key, value in backbone.items() if key != "model_type"}
    torch.manual_seed(len(os.listdir(directory)) + 3)
    model = model_class(config_class(**options)).eval()
    path = os.path.join(directory, f"backbone{len(os.listdir(directory))}")
    model.save_pretrained(path)
    return path


def resized(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    if pixel_values.shape[-1] == size:
        return pixel_values
    return F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------
# Zero gates: every branch computes exactly what its backbone computes alone on the resized image.
# ------------------------------------------------------------------------------------------------
def test_zero_gated_clip_and_convnext_branches_equal_their_backbones(tmp_path):
    clip_dir = save_backbone(CLIPVisionModel, CLIPVisionConfig, tiny_clip_backbone(48, 4, 4), tmp_path)
    convnext_dir = save_backbone(ConvNextModel, ConvNextConfig, tiny_convnext_backbone(), tmp_path)
    model = PIIPVisionModel.from_pretrained_branches(
        [clip_dir, convnext_dir], image_sizes=[96, 128], interaction_groups=[[[0, 1], [2, 3]], [[0, 2], [3, 7]]],
        deform_num_heads=2,
    ).eval()
    # CLIP pretrained at 64 px (4x4 grid) now runs at 96 px (6x6): position embeddings are interpolated.
    pixel_values = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        output = model(pixel_values)
        clip = CLIPVisionModel.from_pretrained(clip_dir).eval()
        clip_hidden = clip(resized(pixel_values, 96), interpolate_pos_encoding=True, output_hidden_states=True)
        clip_last = clip_hidden.hidden_states[-1]  # before any post-LayerNorm
        convnext = ConvNextModel.from_pretrained(convnext_dir).eval()
        convnext_map = convnext(pixel_values).last_hidden_state

    expected_clip_map = clip_last[:, 1:].transpose(1, 2).reshape(2, 48, 6, 6)
    torch.testing.assert_close(output.feature_maps[0], expected_clip_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(output.class_tokens[0], clip_last[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(output.feature_maps[1], convnext_map, atol=1e-5, rtol=0)
    assert output.class_tokens[1] is None


def test_zero_gated_resnet_branch_equals_its_backbone(tmp_path):
    clip_dir = save_backbone(CLIPVisionModel, CLIPVisionConfig, tiny_clip_backbone(48, 4, 4), tmp_path)
    resnet_dir = save_backbone(ResNetModel, ResNetConfig, tiny_resnet_backbone(), tmp_path)
    # Batch-norm statistics that are not the identity, so loading them (buffers) is checked too.
    resnet = ResNetModel.from_pretrained(resnet_dir)
    with torch.no_grad():
        for module in resnet.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    resnet.save_pretrained(resnet_dir)
    model = PIIPVisionModel.from_pretrained_branches(
        [clip_dir, resnet_dir], image_sizes=[64, 128], interaction_groups=[[[0, 1], [2, 3]], [[0, 1], [2, 4]]],
        deform_num_heads=2,
    ).eval()
    pixel_values = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        output = model(pixel_values)
        expected = ResNetModel.from_pretrained(resnet_dir).eval()(pixel_values).last_hidden_state
    assert model.config.branches[1].num_blocks() == 5
    assert output.feature_maps[1].shape == (2, 32, 4, 4)
    torch.testing.assert_close(output.feature_maps[1], expected, atol=1e-5, rtol=0)
    assert output.class_tokens[1] is None


def test_resnet_branch_starts_from_he_initialisation():
    model = PIIPVisionModel(tiny_vision_config(clip_resnet_branches()))
    resnet = model.branches[1]
    stem = resnet.embedder.embedder
    fan_out = stem.convolution.out_channels * stem.convolution.kernel_size[0] * stem.convolution.kernel_size[1]
    # He (fan-out) init, not the small normal init of the interaction and ViT layers.
    assert stem.convolution.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.25)
    for module in resnet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.running_var, torch.ones_like(module.running_var))


def test_frozen_resnet_branch_keeps_its_batch_norm_statistics():
    model = PIIPVisionModel(tiny_vision_config(clip_resnet_branches()))
    for parameter in model.branches[1].parameters():
        parameter.requires_grad_(False)
    model.train()
    norms = [module for module in model.branches[1].modules() if isinstance(module, torch.nn.BatchNorm2d)]
    before = [norm.running_mean.clone() for norm in norms]
    model(torch.randn(2, 3, 128, 128) * 3 + 1)
    assert not any(norm.training for norm in norms)
    assert all(torch.equal(norm.running_mean, mean) for norm, mean in zip(norms, before))
    assert model.interactions[0].training and model.branches[0].training
    # A trainable ResNet branch updates its statistics as usual.
    for parameter in model.branches[1].parameters():
        parameter.requires_grad_(True)
    model.train()
    model(torch.randn(2, 3, 128, 128) * 3 + 1)
    assert all(norm.training for norm in norms)
    assert not torch.equal(norms[0].running_mean, before[0])


def test_resnet_that_downsamples_in_its_first_stage_is_rejected():
    branches = clip_resnet_branches()
    branches[1]["backbone_config"]["downsample_in_first_stage"] = True
    with pytest.raises(ValueError, match="downsample_in_first_stage"):
        tiny_vision_config(branches)


def test_zero_gated_siglip_branch_equals_its_backbone(tmp_path):
    siglip_dir = save_backbone(SiglipVisionModel, SiglipVisionConfig, tiny_siglip_backbone(), tmp_path)
    clip_dir = save_backbone(CLIPVisionModel, CLIPVisionConfig, tiny_clip_backbone(48, 2, 4), tmp_path)
    model = PIIPVisionModel.from_pretrained_branches(
        [clip_dir, siglip_dir], image_sizes=[64, 128], interaction_groups=[[[0, 0], [1, 1]], [[0, 0], [1, 1]]],
        deform_num_heads=2,
    ).eval()
    pixel_values = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        output = model(pixel_values)
        siglip = SiglipVisionModel.from_pretrained(siglip_dir).eval()
        hidden = siglip(pixel_values, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(output.feature_maps[1], hidden.transpose(1, 2).reshape(1, 32, 8, 8), atol=1e-5, rtol=0)


def test_acting_interactions_change_the_branches():
    model = PIIPVisionModel(tiny_vision_config(two_clip_branches())).eval()
    pixel_values = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        before = model(pixel_values).feature_maps
        perturb_interactions(model)
        after = model(pixel_values).feature_maps
    assert all((b - a).abs().max() > 1e-3 for b, a in zip(before, after))


def test_patch_kernel_is_resampled_and_position_grid_kept(tmp_path):
    backbone = tiny_clip_backbone(32, 2, 2, image_size=56, patch=14)  # 4x4 pretrained grid of 14-px patches
    clip_dir = save_backbone(CLIPVisionModel, CLIPVisionConfig, backbone, tmp_path)
    other_dir = save_backbone(CLIPVisionModel, CLIPVisionConfig, tiny_clip_backbone(48, 2, 4), tmp_path)
    model = PIIPVisionModel.from_pretrained_branches(
        [other_dir, clip_dir], image_sizes=[64, 96], interaction_groups=[[[0, 0], [1, 1]], [[0, 0], [1, 1]]],
        patch_sizes=[None, 16], deform_num_heads=2,
    )
    source = CLIPVisionModel.from_pretrained(clip_dir).embeddings
    branch = model.branches[1]
    expected = F.interpolate(source.patch_embedding.weight, size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(branch.embeddings.patch_embedding.weight, expected)
    torch.testing.assert_close(branch.embeddings.position_embedding.weight, source.position_embedding.weight)
    assert model.config.branches[1].pretrain_grid_size == 4
    assert model(torch.randn(1, 3, 96, 96)).feature_maps[1].shape == (1, 32, 6, 6)
    assert resample_patch_kernel(expected, 16) is expected


# ------------------------------------------------------------------------------------------------
# Deformable attention against an independent per-point bilinear sampler.
# ------------------------------------------------------------------------------------------------
def naive_bilinear(value_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample a (C, H, W) map at normalised (x, y) in [0, 1]; pixel centres at (i + 0.5) / size; zeros outside."""
    channels, height, width = value_map.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    result = torch.zeros(channels, dtype=torch.float64)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
        if 0 <= xi < width and 0 <= yi < height:
            result += weight * value_map[:, yi, xi].double()
    return result


def naive_deformable_attention(module: DeformableCrossAttention, query, query_grid, feat, feat_grid):
    heads, points, head_dim = module.num_heads, module.num_points, module.head_dim
    batch, num_queries, _ = query.shape
    value = module.value_proj(feat)
    offsets = module.sampling_offsets(query).view(batch, num_queries, heads, points, 2)
    weights = module.attention_weights(query).view(batch, num_queries, heads, points).softmax(-1)
    feat_h, feat_w = feat_grid
    q_h, q_w = query_grid
    out = torch.zeros(batch, num_queries, heads * head_dim, dtype=torch.float64)
    for b in range(batch):
        for q in range(num_queries):
            ref_x, ref_y = (q % q_w + 0.5) / q_w, (q // q_w + 0.5) / q_h
            for h in range(heads):
                value_map = value[b, :, h * head_dim : (h + 1) * head_dim].T.reshape(head_dim, feat_h, feat_w)
                for p in range(points):
                    x = ref_x + offsets[b, q, h, p, 0].item() / feat_w
                    y = ref_y + offsets[b, q, h, p, 1].item() / feat_h
                    out[b, q, h * head_dim : (h + 1) * head_dim] += weights[b, q, h, p].item() * naive_bilinear(
                        value_map, x, y
                    )
    return module.output_proj(out.float())


def test_deformable_attention_matches_naive_sampling_including_outside_points():
    torch.manual_seed(0)
    config = tiny_vision_config(two_clip_branches(), deform_num_heads=2, deform_num_points=3, deform_ratio=0.5)
    module = DeformableCrossAttention(config, query_dim=16, feat_dim=12)
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0, 1.0)  # large offsets: many points land outside the map
        module.sampling_offsets.bias.normal_(0, 2.0)
        module.attention_weights.weight.normal_(0, 0.5)
    query, feat = torch.randn(2, 6, 16), torch.randn(2, 20, 12)
    query_grid, feat_grid = (2, 3), (4, 5)
    with torch.no_grad():
        fast = module(query, query_grid, feat, feat_grid)
        naive = naive_deformable_attention(module, query, query_grid, feat, feat_grid)
        offsets = module.sampling_offsets(query).view(2, 6, 2, 3, 2)
        reference = cell_centre_reference_points(query_grid, query.device)
        locations = reference[None, :, None, None] + offsets / torch.tensor([5.0, 4.0])
    assert ((locations < 0) | (locations > 1)).any(), "the test must exercise points outside the map"
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)


def test_deformable_attention_initial_offsets_follow_head_directions():
    config = tiny_vision_config(two_clip_branches(), deform_num_heads=4, deform_num_points=2, deform_ratio=0.5)
    module = DeformableCrossAttention(config, query_dim=16, feat_dim=16)
    bias = module.initial_offset_bias().view(4, 2, 2)
    expected_directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    torch.testing.assert_close(bias[:, 0], expected_directions, atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, 1], 2 * expected_directions, atol=1e-6, rtol=0)


def test_fresh_model_has_zero_gates_and_reference_initialisation():
    model = PIIPVisionModel(tiny_vision_config(two_clip_branches()))
    unit = model.interactions[0].units[0]
    for injector in (unit.injector_into_a, unit.injector_into_b):
        assert torch.count_nonzero(injector.attn_gate) == 0 and torch.count_nonzero(injector.ffn_gate) == 0
        assert torch.count_nonzero(injector.attn.sampling_offsets.weight) == 0
        assert torch.count_nonzero(injector.attn.attention_weights.weight) == 0
        torch.testing.assert_close(injector.attn.sampling_offsets.bias, injector.attn.initial_offset_bias())


# ------------------------------------------------------------------------------------------------
# Training and I/O
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["deform", "normal"])
@pytest.mark.parametrize("branches", [two_clip_branches, clip_convnext_branches, clip_resnet_branches, three_branches])
def test_gradients_reach_every_parameter(branches, attention):
    model = PIIPVisionModel(tiny_vision_config(branches(), interaction_attention=attention))
    perturb_interactions(model)
    model.train()
    output = model(torch.randn(2, 3, model.config.image_size, model.config.image_size))
    loss = sum(feature.square().mean() for feature in output.feature_maps)
    loss = loss + sum(token.square().mean() for token in output.class_tokens if token is not None)
    loss.backward()
    without_gradient = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_gradient == []


@pytest.mark.parametrize("options", [{"interaction_proj": False}, {"with_cffn": False}])
def test_interaction_variants_without_projection_or_ffn_train(options):
    branches = two_clip_branches()
    branches[1]["backbone_config"] = tiny_clip_backbone(48, 2, 4)  # equal widths: no projection is needed
    model = PIIPVisionModel(tiny_vision_config(branches, **options))
    unit = model.interactions[0].units[0]
    assert hasattr(unit, "proj_a_to_b") == options.get("interaction_proj", True)
    assert hasattr(unit.injector_into_a, "ffn") == options.get("with_cffn", True)
    perturb_interactions(model)
    sum(feature.sum() for feature in model(torch.randn(1, 3, 128, 128)).feature_maps).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    model = PIIPVisionModel(tiny_vision_config(clip_convnext_branches()))
    perturb_interactions(model)
    model.train()
    pixel_values = torch.randn(1, 3, 128, 128)

    def run(m):
        m.zero_grad()
        loss = sum(feature.sum() for feature in m(pixel_values).feature_maps)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in m.named_parameters()}

    reference_loss, reference_grads = run(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.branches[1].gradient_checkpointing
    loss, grads = run(checkpointed)
    torch.testing.assert_close(loss, reference_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_save_and_reload_gives_identical_outputs(tmp_path):
    model = PIIPVisionModel(tiny_vision_config(clip_convnext_branches())).eval()
    perturb_interactions(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, PIIPVisionModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PIIPVisionConfig)
    pixel_values = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        for expected, actual in zip(model(pixel_values).feature_maps, reloaded(pixel_values).feature_maps):
            torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_batched_input_equals_one_by_one():
    model = PIIPVisionModel(tiny_vision_config(three_branches())).eval()
    perturb_interactions(model)
    pixel_values = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        batched = model(pixel_values).feature_maps
        single = [model(pixel_values[i : i + 1]).feature_maps for i in range(3)]
    for branch in range(3):
        torch.testing.assert_close(batched[branch], torch.cat([s[branch] for s in single]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_stays_close_to_fp32(dtype):
    model = PIIPVisionModel(tiny_vision_config(clip_convnext_branches())).eval()
    perturb_interactions(model)
    pixel_values = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        reference = model(pixel_values).feature_maps
        half = model.to(dtype)(pixel_values.to(dtype)).feature_maps
    for expected, actual in zip(reference, half):
        assert actual.dtype == dtype
        relative = (actual.float() - expected).norm() / expected.norm()
        assert relative < 0.05


# ------------------------------------------------------------------------------------------------
# Bad input and bad configs
# ------------------------------------------------------------------------------------------------
def test_wrong_channel_count_is_rejected():
    model = PIIPVisionModel(tiny_vision_config(two_clip_branches()))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels, got 1"):
        model(torch.randn(1, 1, 128, 128))


def test_wrong_image_size_is_rejected():
    model = PIIPVisionModel(tiny_vision_config(two_clip_branches()))
    with pytest.raises(ValueError, match="takes 128x128 images"):
        model(torch.randn(1, 3, 96, 96))


def test_image_size_the_patches_cannot_tile_is_rejected():
    branches = two_clip_branches()
    branches[1]["image_size"] = 120
    with pytest.raises(ValueError, match="image size 120 is not a multiple of the patch size 16"):
        tiny_vision_config(branches)
    branches = clip_convnext_branches()
    branches[1]["image_size"] = 100
    with pytest.raises(ValueError, match="cannot be tiled by the convnext backbone's total stride 32"):
        tiny_vision_config(branches)


def test_interaction_groups_must_cover_all_blocks():
    branches = two_clip_branches()
    branches[0]["interaction_groups"] = [[0, 1], [2, 2]]
    with pytest.raises(ValueError, match="cover blocks 0..2 but the clip_vision_model backbone has 4 blocks"):
        tiny_vision_config(branches)
    branches[0]["interaction_groups"] = [[0, 1], [3, 3]]
    with pytest.raises(ValueError, match="should start at block 2"):
        tiny_vision_config(branches)


def test_interaction_group_counts_must_agree_between_branches():
    branches = two_clip_branches()
    branches[1]["interaction_groups"] = [[0, 1]]
    with pytest.raises(ValueError, match="same number of interaction groups; got \\[2, 1\\]"):
        tiny_vision_config(branches)


def test_unknown_backbone_and_attention_are_rejected():
    branches = two_clip_branches()
    branches[0]["backbone_config"] = {"model_type": "bert"}
    with pytest.raises(ValueError, match="Unsupported branch backbone model_type 'bert'"):
        tiny_vision_config(branches)
    with pytest.raises(StrictDataclassFieldValidationError, match="interaction_attention.*expected one of"):
        tiny_vision_config(two_clip_branches(), interaction_attention="global")


# ----- properties transformers' own testers check (tests/models/clip) -------------------------------
def test_hidden_states_of_every_branch_in_documented_order():
    config = tiny_vision_config(three_branches())  # CLIP (class token), SigLIP, ConvNeXt
    model = PIIPVisionModel(config).eval()  # zero gates: the last block's output is the final map
    pixel_values = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        output = model(pixel_values, output_hidden_states=True)
    by_branch = model.per_branch(output.hidden_states)
    assert [len(states) for states in by_branch] == [1 + branch.num_blocks() for branch in config.branches]
    assert output.hidden_states == tuple(state for states in by_branch for state in states)
    clip_states, siglip_states, convnext_states = by_branch
    assert all(state.shape == (2, 1 + 4, 48) for state in clip_states)  # class token + 2x2 grid
    assert all(state.shape == (2, 16, 32) for state in siglip_states)
    convnext = config.branches[2]
    block_geometry = [convnext.geometry_after_block(block) for block in range(convnext.num_blocks())]
    assert [tuple(state.shape[1:]) for state in convnext_states[1:]] == [(side**2, width) for width, side in block_geometry]
    for states, feature_map in zip(by_branch, output.feature_maps):
        last = states[-1][:, -feature_map.shape[-1] * feature_map.shape[-2] :]
        torch.testing.assert_close(last, feature_map.flatten(2).transpose(1, 2), atol=0, rtol=0)


def test_attentions_of_every_vit_branch_need_eager_attention():
    config = tiny_vision_config(three_branches())
    model = PIIPVisionModel(config).eval()
    pixel_values = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert model(pixel_values, output_attentions=True).attentions == ()  # sdpa computes no maps (and warns)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        flat = model(pixel_values, output_attentions=True).attentions
    attentions = model.per_branch(flat, "attentions")
    assert [len(branch) for branch in attentions] == [2, 2, 0] and len(flat) == 4
    assert all(attention.shape == (1, 4, 5, 5) for attention in attentions[0])  # heads, class token + 2x2
    assert all(attention.shape == (1, 2, 16, 16) for attention in attentions[1])
    torch.testing.assert_close(attentions[1][0].sum(-1), torch.ones(1, 2, 16))


def test_return_dict_false_gives_a_tuple_and_unknown_arguments_are_refused():
    model = PIIPVisionModel(tiny_vision_config(two_clip_branches())).eval()
    pixel_values = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        as_tuple = model(pixel_values, return_dict=False)
        as_output = model(pixel_values)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.feature_maps[-1].flatten(2).transpose(1, 2), atol=0, rtol=0)
    for actual, expected in zip(as_tuple[1], as_output.feature_maps):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'output_hidden_state'"):
        model(pixel_values, output_hidden_state=True)


def test_position_id_buffers_are_initialised_after_loading(tmp_path):
    PIIPVisionModel(tiny_vision_config(three_branches())).save_pretrained(tmp_path)
    model = PIIPVisionModel.from_pretrained(tmp_path)
    buffers = {name: buffer for name, buffer in model.named_buffers() if name.endswith("position_ids")}
    assert len(buffers) == 2  # the CLIP and the SigLIP branch
    for buffer in buffers.values():
        torch.testing.assert_close(buffer, torch.arange(buffer.shape[-1]).expand(1, -1), atol=0, rtol=0)


def test_enable_input_require_grads_lets_adapters_train_under_reentrant_checkpointing():
    """Frozen backbones, one trainable layer in the second branch's first group (what PEFT leaves trainable)."""
    model = PIIPVisionModel(tiny_vision_config(two_clip_branches()))
    model.requires_grad_(False)
    trainable = model.branches[1].layers[0]
    trainable.requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    assert model.get_input_embeddings() is model.branches[0].embeddings.patch_embedding
    model.enable_input_require_grads()
    model(torch.randn(1, 3, 128, 128)).feature_maps[1].sum().backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in trainable.parameters())


def test_patch_stride_runs_a_resampled_kernel_at_the_pretrained_stride():
    """Official checkpoints with pretrain_patch_size 14 and patch_size 16: a 16x16 kernel at stride 14."""
    strided = {"backbone_config": tiny_clip_backbone(32, 2, 2, image_size=56, patch=14), "image_size": 72,
               "interaction_groups": [[0, 0], [1, 1]], "patch_size": 16, "patch_stride": 14}
    config = tiny_vision_config([two_clip_branches()[0], strided])
    assert config.output_grid_size == (72 - 16) // 14 + 1 == 5
    model = PIIPVisionModel(config).eval()
    pixel_values = torch.randn(1, 3, 72, 72)
    branch = model.branches[1]
    with torch.no_grad():
        patches = branch.embeddings.patch_embedding(pixel_values)
        expected = F.conv2d(pixel_values, branch.embeddings.patch_embedding.weight, stride=14)
        feature_maps = model(pixel_values).feature_maps
    torch.testing.assert_close(patches, expected, atol=0, rtol=0)
    assert feature_maps[1].shape == (1, 32, 5, 5)
    assert config.to_dict()["branches"][1]["patch_stride"] == 14


def test_returned_hidden_states_and_attentions_are_part_of_the_graph():
    """Gradients reach every returned hidden state (feature attribution, retain_grad), as in transformers' models."""
    model = PIIPVisionModel(tiny_vision_config(three_branches(), attn_implementation="eager"))
    perturb_interactions(model)
    output = model(torch.randn(1, 3, 96, 96), output_hidden_states=True, output_attentions=True)
    for tensor in output.hidden_states + output.attentions:
        tensor.retain_grad()
    sum(feature_map.sum() for feature_map in output.feature_maps).backward()
    assert all(state.grad is not None for state in output.hidden_states)
    assert all(attention.grad is not None for attention in output.attentions)
