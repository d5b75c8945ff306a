"""PIIP-LLaVA model: generation with the cache, batching, feature placement, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    clip_convnext_branches,
    perturb_interactions,
    tiny_clip_backbone,
    tiny_vision_config,
    two_clip_branches,
)
from huggingface_hub.errors import StrictDataclassFieldValidationError

from piip_llava import PIIPLlavaConfig, PIIPLlavaForConditionalGeneration

VOCAB = 300
IMAGE_TOKEN = 299


def projector_config(branches: list[dict], hidden_size: int = 64, **options) -> PIIPLlavaConfig:
    """A PIIP-LLaVA config whose projector maps `branches`' outputs to `hidden_size`."""
    text_config = {"model_type": "llama", "hidden_size": hidden_size, "num_attention_heads": 4, "vocab_size": VOCAB}
    return PIIPLlavaConfig(vision_config=tiny_vision_config(branches).to_dict(), text_config=text_config, **options)


def tiny_llava(branches=two_clip_branches, text_model_type="llama", seed=0) -> PIIPLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    text_config = {
        "model_type": text_model_type,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    config = PIIPLlavaConfig(
        vision_config=tiny_vision_config(branches()).to_dict(),
        text_config=text_config,
        image_token_index=IMAGE_TOKEN,
        projector_num_groups=8,
    )
    model = PIIPLlavaForConditionalGeneration(config)
    perturb_interactions(model.model.vision_tower)
    return model.eval()


def prompt_ids(model, prefix: list[int], suffix: list[int], images: int = 1) -> list[int]:
    image_run = [IMAGE_TOKEN] * model.config.num_image_tokens
    return [1] + prefix + image_run * images + suffix


def test_cached_greedy_generation_equals_full_recomputation_and_encodes_images_once():
    model = tiny_llava()
    ids = torch.tensor([prompt_ids(model, [5, 6], [7, 8, 9])])
    pixel_values = torch.randn(1, 3, 128, 128)
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
            max_new_tokens=8, do_sample=False, eos_token_id=None,
        )
    hook.remove()
    assert len(calls) == 1, "the vision encoder must run once per generate() call"

    sequence = ids
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=sequence, pixel_values=pixel_values, use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated.tolist() == sequence.tolist()


def test_batched_left_padded_generation_equals_one_by_one_with_several_images():
    model = tiny_llava(clip_convnext_branches)
    prompts = [
        prompt_ids(model, [5], [7, 8, 9, 10, 11]),
        prompt_ids(model, [12, 13, 14], [15], images=2),  # two images in one sample
        prompt_ids(model, [], [20, 21]),
    ]
    images_per_prompt = [1, 2, 1]
    torch.manual_seed(1)
    pixel_values = torch.randn(4, 3, 128, 128)

    singles, image_index = [], 0
    for ids, count in zip(prompts, images_per_prompt):
        ids_tensor = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids_tensor, attention_mask=torch.ones_like(ids_tensor),
                pixel_values=pixel_values[image_index : image_index + count],
                max_new_tokens=6, do_sample=False, eos_token_id=None,
            )
        singles.append(out[0, len(ids):].tolist())
        image_index += count

    width = max(len(ids) for ids in prompts)
    batch = torch.tensor([[0] * (width - len(ids)) + ids for ids in prompts])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
    with torch.no_grad():
        batched = model.generate(
            input_ids=batch, attention_mask=mask, pixel_values=pixel_values,
            max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    assert batched[:, width:].tolist() == singles
    assert len({tuple(tokens) for tokens in singles}) == len(singles), "samples must differ for the check to mean anything"


def test_image_features_land_exactly_at_the_image_token_positions():
    model = tiny_llava()
    ids = torch.tensor([prompt_ids(model, [5, 6], [7]), prompt_ids(model, [8], [9, 10])[:-1] + [11]])
    pixel_values = torch.randn(2, 3, 128, 128)
    captured = {}

    def capture(module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()

    hook = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixel_values)
        features = torch.stack(model.model.get_image_features(pixel_values).pooler_output)
        expected = model.get_input_embeddings()(ids).clone()
    hook.remove()
    for row in range(2):
        positions = (ids[row] == IMAGE_TOKEN).nonzero().flatten()
        expected[row, positions] = features[row]
    torch.testing.assert_close(captured["inputs_embeds"], expected, atol=0, rtol=0)


def test_any_causal_lm_works_as_the_text_model():
    model = tiny_llava(text_model_type="qwen2")
    ids = torch.tensor([prompt_ids(model, [5], [6])])
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=torch.randn(1, 3, 128, 128), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_layer_norm_projector_and_fixed_output_grid():
    from piip_llava.models.piip_llava.projector import PIIPMultiBranchProjector

    config = projector_config(two_clip_branches(), projector_norm="layer_norm", projector_output_grid_size=4)
    projector = PIIPMultiBranchProjector(config)
    maps = (torch.randn(2, 48, 4, 4), torch.randn(2, 32, 8, 8))
    tokens = projector(maps)
    assert tokens.shape == (2, 16, 64)
    # Independent computation: resize to 4x4 (bilinear), per-branch MLP with LayerNorm, sum.
    expected = 0
    for feature_map, branch in zip(maps, projector.branches):
        resized = torch.nn.functional.interpolate(feature_map, size=(4, 4), mode="bilinear", align_corners=False)
        hidden = branch.linear_1(resized.flatten(2).transpose(1, 2))
        hidden = torch.nn.functional.layer_norm(hidden, (64,), branch.norm.weight, branch.norm.bias)
        expected = expected + branch.linear_2(torch.nn.functional.gelu(hidden))
    torch.testing.assert_close(tokens, expected)
    with pytest.raises(StrictDataclassFieldValidationError, match="projector_norm.*expected one of"):
        projector_config(two_clip_branches(), projector_norm="batch_norm")
    with pytest.raises(ValueError, match="hidden_size 64.*not divisible into projector_num_groups 24"):
        projector_config(two_clip_branches(), projector_num_groups=24)


def triangle_filter_weights(size: int, grid: int) -> torch.Tensor:
    """(grid, size) weights of antialiased bilinear shrinking, from the filter's definition: a triangle as wide
    as the scale factor on each side of each output's centre, normalised to sum to 1."""
    scale = size / grid
    centres = (torch.arange(grid) + 0.5) * scale
    positions = torch.arange(size) + 0.5
    weights = (1 - (positions[None, :] - centres[:, None]).abs() / scale).clamp(min=0)
    return weights / weights.sum(-1, keepdim=True)


def test_antialiased_projector_averages_each_cell_instead_of_reading_one_point():
    from piip_llava.models.piip_llava.projector import resize_to_grid

    feature_map = torch.randn(2, 5, 8, 8)
    weights = triangle_filter_weights(8, 3)
    expected = torch.einsum("gh,bchw,kw->bcgk", weights, feature_map, weights)
    torch.testing.assert_close(resize_to_grid(feature_map, (3, 3), antialias=True), expected)
    # Every position of the corner cell (the first 8/3 positions each way) counts towards the corner token;
    # point sampling reads the corner token from positions 0 and 1 alone.
    assert (weights[0, :3] > 0).all()
    third_column = torch.zeros(1, 1, 8, 8)
    third_column[..., 2] = 1
    assert resize_to_grid(third_column, (3, 3))[0, 0, :, 0].abs().sum() == 0
    assert (resize_to_grid(third_column, (3, 3), antialias=True)[0, 0, :, 0] > 0).all()
    # An enlarged map is interpolated as without antialiasing.
    small = torch.randn(1, 5, 2, 2)
    torch.testing.assert_close(resize_to_grid(small, (3, 3), antialias=True), resize_to_grid(small, (3, 3)))


def test_projector_antialias_is_configured_and_saved(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = tiny_llava()
    assert model.model.multi_modal_projector.antialias is False
    config = model.config
    config.projector_antialias = True
    antialiased = PIIPLlavaForConditionalGeneration(config)
    antialiased.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert reloaded.config.projector_antialias is True
    assert reloaded.model.multi_modal_projector.antialias is True


def test_group_norm_projector_normalises_over_channel_groups_and_positions():
    from piip_llava.models.piip_llava.projector import PIIPMultiBranchProjector

    one_branch = [{"backbone_config": tiny_clip_backbone(8, 1, 2), "image_size": 48, "interaction_groups": [[0, 0]]}]
    projector = PIIPMultiBranchProjector(projector_config(one_branch, hidden_size=16, projector_num_groups=4))
    feature_map = torch.randn(1, 8, 3, 3)
    hidden = projector.branches[0].linear_1(feature_map.flatten(2).transpose(1, 2))  # (1, 9, 16)
    grouped = hidden.transpose(1, 2).reshape(1, 4, 4 * 9)
    normalised = (grouped - grouped.mean(-1, keepdim=True)) / torch.sqrt(grouped.var(-1, unbiased=False, keepdim=True)
                                                                          + 1e-5)
    normalised = normalised.reshape(1, 16, 9).transpose(1, 2)
    expected = projector.branches[0].linear_2(torch.nn.functional.gelu(normalised))
    torch.testing.assert_close(projector((feature_map,)), expected, atol=1e-5, rtol=1e-5)


def test_image_tokens_without_pixel_values_are_rejected_by_generate():
    model = tiny_llava()
    ids = torch.tensor([prompt_ids(model, [5], [6])])
    with pytest.raises(ValueError, match="The prompt has 64 image tokens but no pixel_values"):
        model.generate(input_ids=ids, max_new_tokens=2)


def test_pixel_values_without_image_tokens_are_rejected():
    model = tiny_llava()
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=torch.tensor([[1, 5, 6, 7]]), pixel_values=torch.randn(1, 3, 128, 128))


def test_image_token_count_mismatch_is_rejected():
    model = tiny_llava()
    ids = torch.tensor([prompt_ids(model, [5], [6])[:-3]])  # three image tokens short
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 128, 128))


def test_prompt_longer_than_the_context_is_rejected_by_generate():
    model = tiny_llava()
    ids = torch.tensor([prompt_ids(model, [5] * 200, [6])])
    with pytest.raises(ValueError, match="The prompt is 266 tokens .* the language model's context is 256"):
        model.generate(input_ids=ids, pixel_values=torch.randn(1, 3, 128, 128), max_new_tokens=2)


def test_text_only_batch_runs_without_images():
    model = tiny_llava()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert logits.shape == (1, 4, VOCAB)


def test_save_and_reload_round_trip(tmp_path):
    model = tiny_llava(clip_convnext_branches)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, PIIPLlavaForConditionalGeneration)
    ids = torch.tensor([prompt_ids(model, [5], [6])])
    pixel_values = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, pixel_values=pixel_values).logits,
            model(input_ids=ids, pixel_values=pixel_values).logits, atol=0, rtol=0,
        )


# ----- properties transformers' own testers check (tests/models/llava) -------------------------------
class PIIPLlavaModelTester:
    """Builds a tiny PIIP-LLaVA and its inputs, as transformers' `LlavaVisionText2TextModelTester` does."""

    def __init__(self, branches=two_clip_branches, **text_options):
        self.branches = branches
        self.text_options = text_options

    def model(self, seed: int = 0) -> PIIPLlavaForConditionalGeneration:
        model = tiny_llava(self.branches, seed=seed)
        if self.text_options:
            config = model.config
            config.text_config = type(config.text_config)(**{**config.text_config.to_dict(), **self.text_options})
            torch.manual_seed(seed)
            model = PIIPLlavaForConditionalGeneration(config).eval()
        return model

    def inputs(self, model, batch: int = 2) -> dict:
        ids = torch.tensor([prompt_ids(model, [5 + row, 6], [7, 8 + row]) for row in range(batch)])
        return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 128, 128)}


def test_assisted_decoding_equals_greedy_decoding():
    tester = PIIPLlavaModelTester()
    model = tester.model()
    inputs = tester.inputs(model, batch=1)
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assisted = model.generate(**inputs, max_new_tokens=5, do_sample=False, assistant_model=model)
    torch.testing.assert_close(assisted, greedy, atol=0, rtol=0)


def test_static_cache_generation_when_the_image_token_is_sampled():
    model = PIIPLlavaModelTester().model()
    with torch.no_grad():
        model.lm_head.bias = None
        model.lm_head.weight[IMAGE_TOKEN] = model.lm_head.weight[IMAGE_TOKEN] * 0 + 5.0  # the image id wins
    inputs = PIIPLlavaModelTester().inputs(model, batch=1)
    with torch.no_grad():
        static = model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")
        dynamic = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new_tokens = static[0, inputs["input_ids"].shape[1] :]
    assert (new_tokens == IMAGE_TOKEN).any(), "the test must decode the image id"
    torch.testing.assert_close(static, dynamic, atol=0, rtol=0)


def test_text_only_forward_with_the_image_id_in_the_text_runs_as_llava():
    """Without images, an image id is embedded like any token (LLaVA's behaviour); `generate` is where the
    missing images are reported."""
    model = PIIPLlavaModelTester().model()
    ids = torch.tensor([[1, 5, IMAGE_TOKEN, 6]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        embeds = model.get_input_embeddings()(ids)
        expected = model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)


def test_fullgraph_compiled_forward_equals_eager():
    model = PIIPLlavaModelTester().model()
    inputs = PIIPLlavaModelTester().inputs(model, batch=1)
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager_text = model(input_ids=inputs["input_ids"]).logits
        compiled_text = compiled(input_ids=inputs["input_ids"]).logits
        eager = model(**inputs).logits
        compiled_images = compiled(**inputs).logits
    torch.testing.assert_close(compiled_text, eager_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_images, eager, atol=1e-5, rtol=1e-5)


def test_rope_scaling_runs_past_max_position_embeddings():
    tester = PIIPLlavaModelTester(max_position_embeddings=96, rope_parameters={"rope_type": "linear", "factor": 2.0})
    model = tester.model()
    ids = torch.tensor([prompt_ids(model, [5] * 60, [6])])  # 126 tokens > 96 positions
    pixel_values = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values).logits
        output = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=2, do_sample=False)
    assert logits.shape == (1, 126, VOCAB) and torch.isfinite(logits).all()
    assert output.shape == (1, 128)
    too_long = torch.tensor([prompt_ids(model, [5] * 200, [6])])  # 266 tokens > 96 x 2
    with pytest.raises(ValueError, match="The prompt is 266 tokens .* context is 192; .* RoPE scaling"):
        model.generate(input_ids=too_long, pixel_values=pixel_values, max_new_tokens=2)


def test_past_key_values_keyword_is_the_cache():
    model = PIIPLlavaModelTester().model()
    inputs = PIIPLlavaModelTester().inputs(model, batch=1)
    next_token = torch.tensor([[9]])
    with torch.no_grad():
        full = model(input_ids=torch.cat([inputs["input_ids"], next_token], dim=1), pixel_values=inputs["pixel_values"])
        prefill = model(**inputs, use_cache=True)
        step = model(input_ids=next_token, past_key_values=prefill.cache, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)
    assert step.cache.get_seq_length() == inputs["input_ids"].shape[1] + 1


def test_image_features_follow_llava_output_convention():
    model = PIIPLlavaModelTester(clip_convnext_branches).model()
    pixel_values = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        output = model.model.get_image_features(pixel_values, output_hidden_states=True)
        as_tuple = model.model.get_image_features(pixel_values, return_dict=False)
        maps = model.model.vision_tower(pixel_values).feature_maps
    vision_config = model.config.vision_config
    assert output.last_hidden_state.shape == (2, vision_config.output_grid_size**2, vision_config.hidden_size)
    torch.testing.assert_close(output.last_hidden_state, maps[-1].flatten(2).transpose(1, 2))
    tokens = model.config.num_image_tokens
    assert [tuple(feature.shape) for feature in output.pooler_output] == [(tokens, 64), (tokens, 64)]
    assert len(output.hidden_states) == sum(1 + branch.num_blocks() for branch in vision_config.branches)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], output.last_hidden_state)


@pytest.mark.parametrize("branches", [two_clip_branches, clip_convnext_branches])
def test_every_linear_layer_gets_contiguous_inputs(branches):
    """Backends with contiguous-only GEMMs (oneDNN in serving engines) need this for every Linear."""
    model = PIIPLlavaModelTester(branches).model()
    inputs = PIIPLlavaModelTester(branches).inputs(model, batch=2)
    seen = []
    hooks = [
        module.register_forward_pre_hook(lambda module, args, name=name: seen.append((name, args[0].is_contiguous())))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    assert len({name for name, _ in seen}) > 20
    assert [name for name, contiguous in seen if not contiguous] == []


def test_no_split_modules_come_from_the_branches_and_the_language_model():
    from conftest import three_branches

    model = PIIPLlavaModelTester(three_branches).model()
    assert {"SiglipEncoderLayer", "CLIPEncoderLayer", "ConvNextLayer", "BidirectionalInteractionUnit",
            "LlamaDecoderLayer"} <= set(model._no_split_modules)


def test_generation_mixin_is_named_in_the_bases():
    from transformers import GenerationMixin

    assert GenerationMixin in PIIPLlavaForConditionalGeneration.__bases__
    assert PIIPLlavaForConditionalGeneration.can_generate()
