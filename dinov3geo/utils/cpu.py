"""What the CPU can do: its model, torch's kernel capability and whether bf16 runs natively.

bf16 autocast on a CPU is only fast with native bf16 instructions (AVX-512 BF16 or AMX); on an AVX2-only CPU
torch emulates it, and a ViT forward is 4-5x *slower* than in fp32. Every bf16 choice on CPU (benchmark
defaults, advice) goes through :func:`native_bf16`. dinov3geo's own ``"auto"`` precision stays fp32 on CPU
whatever the CPU (maps and features are then the same numbers on every machine); bf16 on CPU is opt-in.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_info", "cpu_summary", "native_bf16"]

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def native_bf16() -> bool:
    """True when this CPU runs bf16 natively (AVX-512 BF16 or AMX-BF16; Arm: the ``bf16`` feature)."""
    _, flags = _cpuinfo()
    return any(f in flags for f in _BF16_FLAGS) or "bf16" in flags


def cpu_info() -> dict[str, Any]:
    """``{"model", "capability" (torch's kernel level: AVX2, AVX512...), "native_bf16", "logical_cpus"}``."""
    import os

    capability = None
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - informational
        pass
    model, _ = _cpuinfo()
    return {"model": model, "capability": capability, "native_bf16": native_bf16(),
            "logical_cpus": os.cpu_count()}


def cpu_summary() -> str:
    """One line for benchmark output: ``CPU: AMD EPYC (torch AVX512, native bf16: yes, 2 logical CPUs)``."""
    i = cpu_info()
    return (f"CPU: {i['model']} (torch {i['capability']}, native bf16: {'yes' if i['native_bf16'] else 'no'}, "
            f"{i['logical_cpus']} logical CPUs)")
