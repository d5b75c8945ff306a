"""Whether bfloat16 autocast pays off on this machine's CPU.

bfloat16 autocast on the CPU is fast only where the processor multiplies bfloat16 in hardware
(x86: AVX512_BF16 or AMX; Arm: the BF16 extension). Elsewhere oneDNN emulates it, many times slower
than float32 (docs/training.md, "Precision follows the CPU", has the figures). So a training run asked for bf16 on a CPU
without it warns, and the demo recipe (scripts/demo_recipe) turns bf16 on only where it is native.
"""

from __future__ import annotations

from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

CPU_INFO = Path("/proc/cpuinfo")
# CPU feature flags (as Linux lists them) of hardware bfloat16 arithmetic: x86's AVX512_BF16 and AMX, Arm's BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpu_info: Path | None = None) -> frozenset[str]:
    """The feature flags the kernel lists for the CPU (`CPU_INFO` by default); empty where there is no
    /proc/cpuinfo (not Linux)."""
    try:
        text = (cpu_info or CPU_INFO).read_text()
    except OSError:
        return frozenset()
    flags = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        # x86 lists them under "flags", Arm under "Features".
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_native_bf16(cpu_info: Path | None = None) -> bool:
    """True when the CPU multiplies bfloat16 in hardware; False when unknown, so the default stays float32."""
    return bool(cpu_flags(cpu_info) & NATIVE_BF16_FLAGS)


def warn_if_cpu_bf16_is_emulated(bf16: bool, on_cpu: bool, cpu_info: Path | None = None) -> bool:
    """Warn when a CPU run asks for bf16 autocast that this CPU can only emulate; returns whether it warned."""
    if not (bf16 and on_cpu) or cpu_has_native_bf16(cpu_info):
        return False
    logger.warning(
        "bf16 was asked for on a CPU without hardware bfloat16 (no AVX512_BF16, AMX or Arm BF16 flag): "
        "autocast will be emulated and run many times slower than float32. Leave out --bf16 on this machine."
    )
    return True
