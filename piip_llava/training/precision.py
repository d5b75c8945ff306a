"""Whether bfloat16 autocast pays off on this machine's CPU.

bfloat16 autocast on the CPU is fast only where the processor multiplies bfloat16 in hardware
(x86: AVX512_BF16 or AMX; Arm: the BF16 extension). Elsewhere oneDNN emulates it, and it is far
slower than float32, not faster. Measured on this project's machines, 2 cores each:

- Intel with AVX512_BF16: stage 2 of the demo recipe ran 1.7x and its stage-0 LLM 1.37x the float32 steps/s;
- AMD EPYC with AVX2 only: a 4096x256 by 256x688 Linear layer, forward and backward, took 1.51 s
  in bf16 autocast against 0.038 s in float32 (40x slower); one stage-0 LLM step took 47 s
  against 2.04 s;
- AMD EPYC with AVX512_BF16: the stage-0 LLM's 700 steps took 13.3 minutes in bf16 against 22.2 in
  float32, stage 2 6.8 minutes in bf16.

So the synthetic recipe turns bf16 on for stages 1 and 2 by default only where the CPU has it
natively, and a training run asked for bf16 on a CPU without it warns. Its stage-0 loops stay
float32 everywhere: in bf16 the stage-0 LLM did not learn its lookups (`synthetic.pipeline.Recipe`).
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
        "autocast will be emulated and run many times slower than float32 (40x for a Linear layer on an "
        "AVX2 machine). Leave out --bf16 on this machine."
    )
    return True
