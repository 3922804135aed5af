"""Precision and device: which float type a run computes in, autocast around the forward, where a model lives.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import torch
import torch.nn as nn


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device computes bf16 natively, else ``fp32``; others unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    precision = resolve_precision(precision, device)
    if precision == "bf16":
        if not native_bf16(device):
            warnings.warn("precision=bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): matmuls are emulated and "
                          "far slower than fp32 here (measured 0.3 vs 120 GFLOP/s); use train.precision=fp32", stacklevel=2)
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def native_bf16(device: torch.device) -> bool:
    """Does this device compute bf16 matmuls in hardware?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None)
    if device.type == "cpu" and all(callable(f) for f in probe):  # oneDNN's own check (any OS)
        return any(f() for f in probe)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
