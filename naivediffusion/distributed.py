"""Many processes: data-parallel training under torchrun.

`torchrun --nproc_per_node=N -m naivediffusion train ...` starts N copies of the same
program and tells each, through environment variables, which one it is. Data-parallel
training then needs three things: every process starts from the same weights, takes its own
slice of one global batch, and gets the same averaged gradient, which
DistributedDataParallel (DDP) computes by all-reducing the gradients during backward().
With equal slices and each process's loss the mean over its slice, the average of the
N gradients is the gradient of the mean over the global batch: N processes take the
very steps that one process with the whole batch would take (up to float rounding).

This module holds what the Trainer (train.py) needs for that: where this process stands
(`distributed_from_env`), the process group (`init_distributed`, `end_distributed`), the
network in DDP (`wrap_for_processes`), the rank's slice of a global draw (`rank_slice`; the
data's is `data.EpochBatchSampler`'s), the few numbers the processes agree on
(`agree_on_stop` once per step, `mean_over_processes` once per log line), and how a process
tells that another one is gone (`lost_another_process`).

    where = distributed_from_env()          # Distributed(world_size, rank, local_rank)
    device = init_distributed(where, device) if where.enabled else device
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a torchrun launch: process `rank` of `world_size`,
    the `local_rank`-th on its machine (which picks its GPU).

    A plain `python -m naivediffusion train` is Distributed(): world_size 1, rank 0,
    `enabled` False, and then nothing distributed happens, not even a process group.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0


def distributed_from_env() -> Distributed:
    """This process's place in a torchrun launch, from the WORLD_SIZE, RANK and LOCAL_RANK
    variables that torchrun sets; one process when WORLD_SIZE is absent or 1."""
    env = os.environ
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return Distributed()
        rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r}, RANK={env.get('RANK')!r} and "
                         f"LOCAL_RANK={env.get('LOCAL_RANK')!r} do not describe a torchrun process "
                         f"({type(err).__name__}: {err}); start many processes with torchrun "
                         "--nproc_per_node=N, or unset WORLD_SIZE for one") from None
    if not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"RANK={rank} and LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world_size}; "
                         "start many processes with torchrun --nproc_per_node=N")
    return Distributed(world_size, rank, local_rank)


def check_global_batch(batch_size: int, world_size: int) -> None:
    """Raise ValueError unless the global batch splits into `world_size` equal slices
    (unequal slices would weight the images of the smaller ones more in the average)."""
    if batch_size % world_size:
        lower = batch_size // world_size * world_size
        options = " or ".join(str(b) for b in (lower, lower + world_size) if b > 0)
        raise ValueError(f"--batch-size {batch_size} is the global batch, split evenly over the "
                         f"{world_size} processes, but {batch_size} is not divisible by {world_size}; "
                         f"use a multiple of {world_size} (e.g. {options}) or another --nproc_per_node")


# torch.compile's modes that record the network's kernels into CUDA graphs and replay them.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_for_processes(mode: str, world_size: int) -> None:
    """Raise ValueError for a compile mode with CUDA graphs under torchrun: DDP's gradient
    hooks and the graphs' replay are a combination PyTorch's own tracker shows to be fragile
    (crashes during and after training); inductor without graphs compiles the same kernels."""
    if world_size > 1 and mode in CUDA_GRAPH_MODES:
        raise ValueError(f"--compile {mode} records CUDA graphs, which are not reliable with "
                         f"{world_size} processes (DistributedDataParallel); use --compile default "
                         "or max-autotune-no-cudagraphs under torchrun")


# How long a collective waits for the slowest process before the group gives up on it. Set
# explicitly, longer than torch's default for NCCL (10 minutes): the first step of a compiled
# network can take minutes on one rank while the others already wait at the first all-reduce.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def init_distributed(where: Distributed, device: torch.device) -> torch.device:
    """Join the process group of a torchrun launch; returns this process's device.

    "nccl" moves gradients GPU to GPU, so on CUDA each process takes the GPU cuda:LOCAL_RANK;
    "gloo" runs on the CPU. torchrun's MASTER_ADDR and MASTER_PORT say where to meet
    (init_method "env://"). A group that already exists (made by the caller) is reused.
    """
    if not torch.distributed.is_available():
        raise ValueError("this PyTorch was built without torch.distributed, so it cannot train with "
                         "many processes; run one process (python -m naivediffusion train)")
    if device.type == "mps":
        raise ValueError("training with many processes needs --device cuda or cpu; MPS has no "
                         "backend for torch.distributed")
    if device.type == "cuda":
        if where.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {where.local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; start at most that many processes with "
                             "torchrun --nproc_per_node")
        device = torch.device("cuda", where.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                             timeout=PROCESS_GROUP_TIMEOUT)
    return device


def end_distributed() -> None:
    """Leave the process group, if this process joined one (call it when every process has
    finished, on the way out: torch warns about a group that was never destroyed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_for_processes(model: torch.nn.Module, where: Distributed, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel under torchrun, else `model` itself.

    DDP copies rank 0's weights to every process once, here, and from then on averages
    the gradients over the processes during each backward(), so that every process's
    optimizer takes the same step and the weights stay equal without being sent again.
    """
    if not where.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def rank_slice(tensor: Tensor, where: Distributed) -> Tensor:
    """This process's rows of a global draw [B, ...]: [B / N, ...], rows rank * B / N on
    (all of it for one process)."""
    if not where.enabled:
        return tensor
    per_rank = tensor.shape[0] // where.world_size
    return tensor[where.rank * per_rank:(where.rank + 1) * per_rank]


def host_group(where: Distributed):
    """The group on which the processes agree on host numbers (`agree_on_stop`): gloo, which
    reduces CPU tensors (nccl only reduces GPU ones). None means the default group, which is
    gloo already, or for one process, where there is nothing to agree on."""
    if where.enabled and torch.distributed.get_backend() != "gloo":
        return torch.distributed.new_group(backend="gloo")
    return None


def agree_on_stop(elapsed: float, signum: int | None, group=None) -> tuple[float, int | None]:
    """Make every process take the same decisions at this step: (the largest `elapsed` of all
    processes, the signal that stops the run or None).

    Each process times its own steps and gets its own signals (torchrun passes a Ctrl-C
    on to every process, but not at the same instant), so left alone one might stop a
    step earlier than the others and leave them waiting for it forever. Once per step
    they all-reduce (max) two host numbers on a CPU (gloo) `group` (`host_group`): the
    training time, so that the --max-minutes plan and the time-up check agree, and the
    signal, so that all stop at the same step. It is the only per-step exchange besides
    DDP's gradients; it never waits for the GPU, only for the slowest process, which DDP
    waits for anyway.
    """
    values = torch.tensor([elapsed, float(signum or 0)], dtype=torch.float64)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX, group=group)
    return values[0].item(), int(values[1].item()) or None


def mean_over_processes(value: Tensor, where: Distributed) -> Tensor:
    """The mean of each process's `value` (a tensor on this process's device), the same on
    every process; `value` itself for one process. A collective: every process calls it.
    The result is a new tensor, so `value` can be reduced again later."""
    if not where.enabled:
        return value
    total = value.clone()
    torch.distributed.all_reduce(total)  # the sum over processes
    return total / where.world_size  # equal slices: the mean of the means


def lost_another_process(err: RuntimeError) -> bool:
    """Whether `err` is torch.distributed saying that another process of the run is gone: gloo
    finds the connection closed, nccl raises a DistError. The process that failed has printed
    its own error; this one should only say why it stops."""
    if isinstance(err, torch.distributed.DistError):
        return True
    return "Connection closed by peer" in str(err) or "Connection reset by peer" in str(err)
