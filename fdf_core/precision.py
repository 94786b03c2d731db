"""Which number format the networks run in at inference: bf16 where the hardware has bf16 units.

Training picks its precision through Lightning (`--trainer.precision bf16-mixed`); inference
(`anonymize`, the video path, `fdf-eval`) goes through `autocast()` here, so that one rule decides
for all of them; the FID during training keeps fp32 (GeneratorAt's default), so curves stay
comparable across runs. "auto" means bf16 on a GPU that supports it and on a CPU
with native bf16 instructions (AVX512-BF16 or AMX: oneDNN runs bf16 convolutions there at about
twice the fp32 rate), fp32 elsewhere: on a CPU without them bf16 is emulated and slower than fp32.
Outputs are returned as fp32 either way.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from fdf_core.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU executes bf16 dot products natively (Linux: its flags in /proc/cpuinfo)."""
    try:
        flags = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    return any(f in flags.split() for f in BF16_CPU_FLAGS) and torch.backends.mkldnn.is_available()


def resolve(precision: str, device: str | torch.device) -> str:
    """"bf16" or "fp32" for `precision` ("auto", "bf16" or "fp32") on `device`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """A context in which the networks run at `resolve(precision, device)`."""
    device = torch.device(device)
    if resolve(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
