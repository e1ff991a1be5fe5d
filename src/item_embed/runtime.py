"""Where the math runs: the device, the precision, and the processes of a torchrun job.

One meaning of ``precision`` everywhere (training, encoding, serving, evaluation): ``auto`` is bf16
where the device multiplies bf16 matrices natively and fp32 elsewhere; ``bf16`` and ``fp32`` are
taken as given. Outputs record the resolved choice.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import PRECISIONS


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as given, else CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU with bf16 support, or
    a CPU with AMX or AVX512-BF16. Elsewhere bf16 is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:  # private helpers (torch 2.x); if they move, fall back to fp32 rather than guess
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16`, else ``fp32``; ``bf16`` / ``fp32`` as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast on ``device`` for a resolved ``precision`` of bf16; nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"resolve the precision first: {precision!r}")
    return nullcontext()


@dataclass
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> tuple[Ranks, torch.device]:
    """Join the torchrun job if there is one (gloo on CPU, NCCL on GPU) and pick this rank's device."""
    want_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), pick_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    return Ranks(dist.get_rank(), dist.get_world_size()), dev


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process run alone (before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"
