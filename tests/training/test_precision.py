"""bf16 autocast only where the CPU has hardware bfloat16: flag parsing, the recipe default, the trainer's warning;
the float32 attention kernel kept inside bf16 autocast."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from piip_llava.synthetic.pipeline import Recipe
from piip_llava.synthetic.pretraining import LanguagePretraining, language_model_to_pretrain
from piip_llava.training import precision
from piip_llava.training.precision import (
    FLOAT32_ATTENTION,
    cpu_flags,
    cpu_has_native_bf16,
    float32_sdpa_attention,
    warn_if_cpu_bf16_is_emulated,
)

# Shortened /proc/cpuinfo of the machines the docs quote, and of an Arm server.
AVX2_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 bmi2
"""
INTEL_AVX512_BF16 = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_tile amx_bf16
"""
ARM_BF16 = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes sve bf16 i8mm
"""


@pytest.fixture
def cpu_info(tmp_path):
    def write(text: str):
        path = tmp_path / f"cpuinfo_{len(list(tmp_path.iterdir()))}"
        path.write_text(text)
        return path

    return write


def test_flags_are_read_from_x86_and_arm_cpuinfo(cpu_info):
    assert {"avx2", "fma"} <= cpu_flags(cpu_info(AVX2_EPYC))
    assert "avx512_bf16" not in cpu_flags(cpu_info(AVX2_EPYC))
    assert {"sve", "bf16"} <= cpu_flags(cpu_info(ARM_BF16))


@pytest.mark.parametrize(("text", "native"), [(AVX2_EPYC, False), (INTEL_AVX512_BF16, True), (ARM_BF16, True)])
def test_native_bf16_only_with_a_hardware_bfloat16_flag(cpu_info, text, native):
    assert cpu_has_native_bf16(cpu_info(text)) is native


def test_an_unreadable_cpuinfo_means_float32(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert cpu_has_native_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize(("text", "native"), [(AVX2_EPYC, False), (INTEL_AVX512_BF16, True)])
def test_the_synthetic_recipe_uses_bf16_by_default_only_on_a_native_bf16_cpu(cpu_info, monkeypatch, text, native):
    monkeypatch.setattr(precision, "CPU_INFO", cpu_info(text))
    assert Recipe().bf16 is native
    assert Recipe(bf16=True).bf16 is True


def test_a_cpu_run_asking_for_emulated_bf16_warns(cpu_info, caplog):
    avx2, intel = cpu_info(AVX2_EPYC), cpu_info(INTEL_AVX512_BF16)
    with caplog.at_level(logging.WARNING):
        assert warn_if_cpu_bf16_is_emulated(bf16=True, on_cpu=True, cpu_info=avx2) is True
    assert "without hardware bfloat16" in caplog.text and "Leave out --bf16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert warn_if_cpu_bf16_is_emulated(bf16=True, on_cpu=True, cpu_info=intel) is False
        assert warn_if_cpu_bf16_is_emulated(bf16=True, on_cpu=False, cpu_info=avx2) is False
        assert warn_if_cpu_bf16_is_emulated(bf16=False, on_cpu=True, cpu_info=avx2) is False
    assert caplog.text == ""


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
