"""bf16 autocast only where the CPU has hardware bfloat16: flag parsing and the trainer's warning."""

import logging

import pytest

from piip_llava.training.precision import cpu_flags, cpu_has_native_bf16, warn_if_cpu_bf16_is_emulated

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
