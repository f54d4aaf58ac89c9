"""Training on several processes with PyTorch's own engine: `torchrun` (or SLURM through it) starts one
process per GPU (or several gloo processes on a CPU) and sets RANK, WORLD_SIZE and LOCAL_RANK.

Every trainer draws the same global batch on every process (the batch order is a function of seed and
step) and takes its rank's share: rows rank, rank + W, rank + 2W, ... DistributedDataParallel averages the
gradients, so W processes take the step one process would take on the whole batch. Only rank 0 logs,
validates and writes checkpoints; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from neuroar.errors import NeuroARError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: list[int], accumulation: int = 1) -> list[list[int]]:
        """This rank's share of a global batch, split into `accumulation` micro-batches."""
        if len(rows) % (self.world * accumulation):
            raise NeuroARError(f"a batch of {len(rows)} does not split evenly over {self.world} processes x "
                               f"{accumulation} accumulation steps; make the batch size a multiple of "
                               f"{self.world * accumulation}.")
        mine = rows[self.rank::self.world]
        size = len(mine) // accumulation
        return [mine[i * size:(i + 1) * size] for i in range(accumulation)]

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module under DistributedDataParallel when there are several processes."""
        if self.world == 1:
            return module
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the processes (every rank gets the same dict back)."""
        if self.world == 1 or not values:
            return values
        stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(stacked)
        return dict(zip(values, (stacked / self.world).tolist()))

    def gather_batch(self, x_B: torch.Tensor) -> torch.Tensor:
        """The global batch from every rank's share (rows rank::W), in the global order; no gradient. A single
        process gets its input back."""
        if self.world == 1:
            return x_B
        parts = [torch.empty_like(x_B) for _ in range(self.world)]
        dist.all_gather(parts, x_B.contiguous())
        return torch.stack(parts, 1).flatten(0, 1)  # item j of rank r was global row j * W + r

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """`x` overwritten in place with rank 0's values (and returned)."""
        if self.world > 1:
            dist.broadcast(x, src=0)
        return x

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init() -> Context:
    """The process group of a `torchrun` launch (NCCL on GPUs, gloo on CPUs), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Context(device=default_device())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    # More processes than GPUs on a node (e.g. 2 on one GPU, to test DDP there) share the GPUs over gloo:
    # NCCL refuses two ranks on one device.
    gpus = torch.cuda.device_count() if cuda else 0
    if cuda:
        torch.cuda.set_device(local % gpus)
    if not dist.is_initialized():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        dist.init_process_group("nccl" if cuda and local_world <= gpus else "gloo")
        # Left to the interpreter's teardown, gloo's worker threads free tensors after Python is gone and the
        # process aborts ("terminate called without an active exception", seen in CI at exit of a finished run).
        atexit.register(close)
    return Context(dist.get_rank(), world, torch.device("cuda", local % gpus) if cuda else torch.device("cpu"))


def close() -> None:
    """The process group released while Python is still alive (a no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_program(code: int) -> None:
    """End the `neuroar` program with `code`. A torchrun worker leaves without the interpreter's teardown: gloo's
    threads still hold tensors then and abort the finished process now and then (SIGABRT, "terminate called
    without an active exception", in CI after a run had written everything, even with `close` at exit;
    pytorch/pytorch#179291 was abandoned as harder than it looked). Every trainer ends on a barrier, so no
    rank is still talking when this one leaves."""
    if not dist.is_initialized():
        raise SystemExit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def default_device() -> torch.device:
    """Where a single process computes: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA (training, and encoding scans as training did); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(device: torch.device):
    """float32 without autocast or TF32, deterministic cuDNN kernels: for work whose numbers decide discrete
    choices (a scan's tokens), so that they depend as little on the device as kernels allow."""
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cuda", enabled=False))
    stack.enter_context(torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                                   allow_tf32=False))
    return stack


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def no_sync(module: nn.Module, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if isinstance(module, DistributedDataParallel) and not last:
        return module.no_sync()
    return contextlib.nullcontext()
