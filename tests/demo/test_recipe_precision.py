"""The demo recipe's precision: bf16 by default only on a CPU with hardware bfloat16, and its stage-0 LLM's
attention kernel kept in float32 inside bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F
from demo_recipe.pipeline import Recipe
from demo_recipe.precision import FLOAT32_ATTENTION, float32_sdpa_attention
from demo_recipe.pretraining import LanguagePretraining, language_model_to_pretrain
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from piip_llava.training import precision

AVX2_ONLY = "flags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_BF16 = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_tile amx_bf16\n"


@pytest.mark.parametrize(("text", "native"), [(AVX2_ONLY, False), (AVX512_BF16, True)])
def test_the_recipe_uses_bf16_by_default_only_on_a_native_bf16_cpu(tmp_path, monkeypatch, text, native):
    cpu_info = tmp_path / "cpuinfo"
    cpu_info.write_text(text)
    monkeypatch.setattr(precision, "CPU_INFO", cpu_info)
    assert Recipe().bf16 is native
    assert Recipe(bf16=True).bf16 is True


class CausalAttention(nn.Module):
    """What transformers' SDPA function reads from the attention module calling it."""

    is_causal = True


def test_the_float32_attention_computes_sdpa_in_float32_inside_bf16_autocast():
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 4, 12, 16).to(torch.bfloat16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16, _ = sdpa_attention_forward(CausalAttention(), query, key, value, None)
        in_float32, _ = float32_sdpa_attention(CausalAttention(), query, key, value, None)
    assert in_bf16.dtype == torch.bfloat16 and in_float32.dtype == torch.float32
    expected = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(in_float32, expected)


def test_a_bf16_stage_0_llm_runs_its_attention_in_float32_and_saves_without_naming_it(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "random")
    model = language_model_to_pretrain(tmp_path / "random", LanguagePretraining(bf16=True))
    assert model.config._attn_implementation == FLOAT32_ATTENTION and model.training
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    # What each layer's output projection is handed is the attention kernel's result.
    kernel_outputs = []
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_pre_hook(lambda module, inputs: kernel_outputs.append(inputs[0].dtype))
    ids = torch.randint(0, 64, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    assert kernel_outputs == [torch.float32] * config.num_hidden_layers
    assert language_model_to_pretrain(tmp_path / "random", LanguagePretraining()).config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path / "trained")
    assert FLOAT32_ATTENTION not in (tmp_path / "trained" / "config.json").read_text()
    assert LlamaForCausalLM.from_pretrained(tmp_path / "trained").config._attn_implementation == "sdpa"
