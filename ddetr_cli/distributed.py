"""Device selection and torchrun/DDP plumbing shared by train, eval and predict.

Under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK in the environment) `setup` joins the process group:
NCCL when the processes drive GPUs, gloo on the CPU. Only rank 0 writes files; evaluation gathers
every rank's detections with `all_gather_object`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum

from ddetr_cli.console import UserError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: object = "cpu"  # torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | None, local_rank: int = 0):
    """`--device` -> torch.device: None/'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N', or 'N'."""
    import torch

    text = (device or "auto").strip().lower()
    if text == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if text.isdigit():
        text = f"cuda:{text}"
    if text == "cuda":
        text = f"cuda:{local_rank}"
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda:") and text[5:].isdigit():
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        index = int(text[5:])
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device(text)
    raise UserError(f"--device must be cpu, cuda, cuda:N or N, got {device!r}")


def setup(device: str | None = None) -> DistContext:
    """Join the torchrun process group when launched by torchrun; pick this process's device."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dev = torch.device(f"cuda:{local_rank}")  # one GPU per process
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's `obj` on every rank."""
    if not ctx.distributed:
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_lists(items: list, ctx: DistContext) -> list:
    """Concatenation of every rank's list, on every rank."""
    if not ctx.distributed:
        return list(items)
    import torch.distributed as dist

    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def mean_over_ranks(values: dict, ctx: DistContext) -> dict:
    """{name: float} averaged over ranks (the logged losses), in one all_reduce."""
    if not ctx.distributed or not values:
        return dict(values)
    import torch
    import torch.distributed as dist

    names = sorted(values)
    device = ctx.device if getattr(ctx.device, "type", "cpu") == "cuda" else "cpu"
    t = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= ctx.world_size
    return dict(zip(names, t.tolist()))


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is True on at least one."""
    if not ctx.distributed:
        return flag
    import torch
    import torch.distributed as dist

    device = ctx.device if getattr(ctx.device, "type", "cpu") == "cuda" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class Amp(str, Enum):
    """--amp choices."""

    off = "off"
    fp16 = "fp16"
    bf16 = "bf16"


AMP_DTYPES = {"off": None, "fp16": "float16", "bf16": "bfloat16"}


def autocast(device, amp: str):
    """Mixed-precision context for `--amp off|fp16|bf16` on `device` (a no-op for 'off')."""
    import contextlib

    import torch

    amp = amp.value if isinstance(amp, Amp) else amp
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp must be one of off, fp16, bf16, got {amp!r}")
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, AMP_DTYPES[amp]))
