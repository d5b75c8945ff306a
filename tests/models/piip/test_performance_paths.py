"""Speed paths of the PIIP encoder compute what the plain paths compute: caches, attention kernels, torch.compile.

No timing is asserted here; `piip-llava bench` measures speed (see docs/performance.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import clip_convnext_branches, perturb_interactions, tiny_vision_config, two_clip_branches

from piip_llava.models.piip import PIIPVisionModel
from piip_llava.models.piip.branches import interpolate_position_grid
from piip_llava.models.piip.interactions import DeformableCrossAttention, cell_centre_reference_points


def tiny_model(branches=two_clip_branches, **config_options) -> PIIPVisionModel:
    torch.manual_seed(0)
    model = PIIPVisionModel(tiny_vision_config(branches(), **config_options))
    perturb_interactions(model)
    return model.eval()


def fresh_positions(branch, grid) -> torch.Tensor:
    """The interpolated patch positions computed from scratch, bypassing every cache."""
    return interpolate_position_grid(branch.embeddings.position_embedding.weight[1:].detach(), grid)


# ----- position embeddings ---------------------------------------------------------------------
def test_position_cache_returns_identical_values_and_is_reused():
    branch = tiny_model().branches[1]  # pretrained 4x4 grid, runs on 8x8
    with torch.no_grad():
        first, _ = branch.position_embeddings((8, 8))
        second, _ = branch.position_embeddings((8, 8))
    assert second is first, "the second call must reuse the cached table"
    torch.testing.assert_close(first, fresh_positions(branch, (8, 8)), atol=0, rtol=0)


def test_position_cache_is_invalidated_by_in_place_weight_updates():
    branch = tiny_model().branches[1]
    table = branch.embeddings.position_embedding.weight
    with torch.no_grad():
        before, _ = branch.position_embeddings((8, 8))
        table.add_(1.0)  # what optimizers and load_state_dict do: an in-place write
        after, _ = branch.position_embeddings((8, 8))
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, fresh_positions(branch, (8, 8)), atol=0, rtol=0)


def test_position_cache_is_invalidated_by_load_state_dict_and_an_optimizer_step():
    model = tiny_model()
    branch = model.branches[1]
    pixel_values = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        model(pixel_values)  # fills the cache
    state = copy.deepcopy(model.state_dict())
    state["branches.1.embeddings.position_embedding.weight"] += 0.5
    model.load_state_dict(state)
    with torch.no_grad():
        cached, _ = branch.position_embeddings((8, 8))
    torch.testing.assert_close(cached, fresh_positions(branch, (8, 8)), atol=0, rtol=0)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = sum(feature.square().mean() for feature in model(pixel_values).feature_maps)
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        cached, _ = branch.position_embeddings((8, 8))
    torch.testing.assert_close(cached, fresh_positions(branch, (8, 8)), atol=0, rtol=0)


def test_position_cache_follows_the_grid_and_a_moved_or_copied_weight():
    model = tiny_model()
    branch = model.branches[1]
    with torch.no_grad():
        on_8, _ = branch.position_embeddings((8, 8))
        on_6, _ = branch.position_embeddings((6, 6))
        assert on_6.shape == (36, 32) and on_8.shape == (64, 32)
        torch.testing.assert_close(on_6, fresh_positions(branch, (6, 6)), atol=0, rtol=0)
        doubled = model.to(torch.float64).branches[1]  # a new tensor: another data_ptr and dtype
        positions, _ = doubled.position_embeddings((8, 8))
    assert positions.dtype == torch.float64
    torch.testing.assert_close(positions, fresh_positions(doubled, (8, 8)), atol=0, rtol=0)


def test_position_cache_is_never_used_while_training_or_with_autograd():
    model = tiny_model()
    branch = model.branches[1]
    with torch.no_grad():
        branch.position_embeddings((8, 8))  # a cached, graph-free table exists
    positions, _ = branch.position_embeddings((8, 8))  # grad enabled: must be a fresh, differentiable result
    assert positions.requires_grad
    positions.sum().backward()
    assert branch.embeddings.position_embedding.weight.grad.abs().sum() > 0
    model.train()
    with torch.no_grad():
        first, _ = branch.position_embeddings((8, 8))
        second, _ = branch.position_embeddings((8, 8))
    assert first is not second, "training mode computes the table on every call"


def test_cached_forward_equals_uncached_forward():
    model = tiny_model(clip_convnext_branches)
    pixel_values = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        cached = [model(pixel_values).feature_maps for _ in range(2)][-1]
        model.branches[0].clear_position_cache()
        for module in model.modules():
            if isinstance(module, DeformableCrossAttention):
                module.clear_sampling_cache()
        model.train()  # training mode bypasses the caches; the tiny configs have no dropout or drop path
        uncached = model(pixel_values).feature_maps
    for expected, actual in zip(uncached, cached):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)


# ----- deformable attention constants ------------------------------------------------------------
def test_sampling_constants_are_built_once_per_shape_and_equal_fresh_ones():
    config = tiny_vision_config(two_clip_branches(), deform_num_heads=2, deform_num_points=2, deform_ratio=0.5)
    module = DeformableCrossAttention(config, query_dim=16, feat_dim=16)
    reference, normaliser = module.sampling_constants((2, 3), (4, 5), torch.device("cpu"))
    again, _ = module.sampling_constants((2, 3), (4, 5), torch.device("cpu"))
    assert again is reference
    torch.testing.assert_close(reference, cell_centre_reference_points((2, 3), torch.device("cpu")), atol=0, rtol=0)
    torch.testing.assert_close(normaliser, torch.tensor([5.0, 4.0]), atol=0, rtol=0)
    other_reference, other_normaliser = module.sampling_constants((3, 2), (5, 4), torch.device("cpu"))
    assert other_reference.shape == (6, 2) and not torch.equal(other_reference, reference)
    torch.testing.assert_close(other_normaliser, torch.tensor([4.0, 5.0]), atol=0, rtol=0)


# ----- attention implementation --------------------------------------------------------------------
def test_sdpa_is_the_default_and_eager_attention_gives_the_same_output():
    model = tiny_model()
    assert model.config._attn_implementation == "sdpa"
    assert all(branch.config._attn_implementation == "sdpa" for branch in model.branches)
    pixel_values = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        sdpa = model(pixel_values).feature_maps
        model.set_attn_implementation("eager")
        eager = model(pixel_values).feature_maps
    assert all(branch.config._attn_implementation == "eager" for branch in model.branches)
    for expected, actual in zip(sdpa, eager):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_eager_attention_can_be_chosen_at_construction():
    config = tiny_vision_config(two_clip_branches())
    config._attn_implementation = "eager"
    model = PIIPVisionModel(config)
    assert all(branch.config._attn_implementation == "eager" for branch in model.branches)


# ----- torch.compile ------------------------------------------------------------------------------
@pytest.mark.parametrize("branches", [two_clip_branches, clip_convnext_branches])
def test_compiled_blocks_agree_with_eager_and_keep_parameter_names(branches):
    # The aot_eager backend traces and partitions graphs like the default backend but skips code
    # generation, which takes minutes on two CPU cores; `bench --compile` exercises inductor.
    model = tiny_model(branches)
    pixel_values = torch.randn(1, 3, 128, 128)
    names = list(model.state_dict())
    with torch.no_grad():
        eager = model(pixel_values).feature_maps
        model.compile_blocks(backend="aot_eager")
        compiled = model(pixel_values).feature_maps
    assert list(model.state_dict()) == names
    for expected, actual in zip(eager, compiled):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
