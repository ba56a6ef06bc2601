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
(`agree_on_stop` once per step, `mean_over_processes` once per log line), the order in which
they prepare the data (`main_process_first`: rank 0 downloads a missing dataset while the others
wait, then they load it), and how a process tells that another one is gone
(`lost_another_process`).

    where = distributed_from_env()          # Distributed(world_size, rank, local_rank)
    device = init_distributed(where, device) if where.enabled else device
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
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


@contextmanager
def main_process_first(where: Distributed, group=None, what: str = "the data"):
    """Run the body of the `with` on rank 0 first, then on the other ranks, and leave together.

        with main_process_first(trainer.dist, host_group(trainer.dist)):
            data = load_dataset("mnist")  # rank 0 downloads it if missing; then the others read it

    N processes that download a missing dataset into the same folder at once write the same
    files over each other: one reads a half-written file, or finds it corrupt, and the run fails
    on a fresh machine. Here the non-main ranks wait while rank 0 runs the body (and downloads),
    then run it themselves and find the files there. With one process it does nothing.

    Waiting must not hang when rank 0 fails. So the wait is not a bare barrier that rank 0 may
    never reach but an exchange (an all-reduce on `group`) of one flag per rank, "my body
    raised", that rank 0 joins whether its body returned or raised (any exception, Ctrl-C
    included): when its body raised, the others skip theirs and raise a one-line ValueError
    ("rank 0 could not prepare the data, so this process stops too; rank 0's error says why")
    while rank 0 raises its own error. (Each process prints its own line, in no set order, so
    the line points at rank 0's rather than saying "above".) If rank 0 dies outright, its
    connections close; if it is stuck in a download, the others give up after the group's
    timeout (`PROCESS_GROUP_TIMEOUT`, 30 minutes): either way the waiting ranks raise the same
    kind of one-line error, and torchrun stops the rest.

    After the body every rank exchanges its flag once more, so that a rank whose body failed
    (say, it reads another machine's disk, where rank 0 downloaded nothing) stops every process
    at once, each with one line naming it, rather than leaving them waiting at the first step.
    Every process must enter the `with` (a collective), and so the body may not itself wait for
    the other processes.

    `group` is a CPU (gloo) group, `host_group(where)`, or None for the default group (then on
    the current GPU if that is nccl's); `what` names the body's work in the messages. With
    several machines, each with its own disk, rank 0 prepares only its machine's copy and the
    processes of each other machine would fetch theirs at once: give them a data root they
    share, or prepare it on each machine before the run.
    """
    if not where.enabled:
        yield
        return
    if where.is_main:
        try:
            yield
        except BaseException:
            _failed_ranks(where, group, failed=True, quiet=True)  # release the waiting ranks
            raise
        _failed_ranks(where, group, failed=False)  # the others go on to the body
    else:
        try:
            rank0_failed = _failed_ranks(where, group, failed=False)  # wait for rank 0's body
        except RuntimeError as err:
            raise ValueError(f"rank 0 stopped before it had prepared {what} ({_first_line(err)}); its "
                             "error, if it printed one, says why") from err
        if rank0_failed:
            raise ValueError(f"rank 0 could not prepare {what}, so this process stops too; rank 0's "
                             "error says why")
        try:
            yield
        except BaseException:
            _failed_ranks(where, group, failed=True, quiet=True)
            raise
    try:
        failed = _failed_ranks(where, group, failed=False)  # did every other rank's body succeed?
    except RuntimeError as err:
        raise ValueError(f"another process stopped while preparing {what} ({_first_line(err)}); "
                         "its error, if it printed one, says why") from err
    if failed:
        ranks = f"rank {failed[0]}'s error says" if len(failed) == 1 else "their errors say"
        raise ValueError(f"rank {', '.join(map(str, failed))} of {where.world_size} could not prepare "
                         f"{what}, so this process stops too; {ranks} why")


def _failed_ranks(where: Distributed, group, failed: bool, quiet: bool = False) -> list[int]:
    """The ranks that say they failed, this one among them if `failed`: an all-reduce (sum) of
    one flag per rank on `group`, so every process waits here for all the others. `quiet`
    swallows a failure of the exchange itself (the caller is raising an error of its own)."""
    on_gpu = torch.distributed.get_backend(group) == "nccl"
    flags = torch.zeros(where.world_size, dtype=torch.int64,
                        device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    flags[where.rank] = int(failed)
    try:
        torch.distributed.all_reduce(flags, group=group)
    except RuntimeError:
        if quiet:
            return []
        raise
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


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
