"""A stage process's place in a torchrun (DDP) job: which rank it is, and the few collectives the
pipeline itself needs on top of what the HF Trainer does.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK in each rank's environment; the Trainer (through
accelerate) reads the same variables and creates the process group (gloo on CPU, nccl on CUDA) when
its TrainingArguments are built. Outside torchrun every function here is a no-op for rank 0 of 1.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 alone writes what the orchestrator reads: events, the result, outputs, the gate."""
    return rank() == 0


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so neither the orchestrator's killpg nor a
    SIGKILL of torchrun (the orchestrator's PR_SET_PDEATHSIG, or its SIGKILL after the grace period)
    reaches the ranks. Tie each rank to torchrun: if torchrun dies, so does the rank."""
    if not under_torchrun() or sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # torchrun died before the prctl: nobody is left to collect this rank's work
        os._exit(1)


def _group_ready() -> bool:
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any: a stop request must end training at the same step
    on all ranks, or one rank waits forever in a collective the others never enter."""
    if not _group_ready():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# The process group's backend as training saw it (gloo, nccl), for the stage's metrics: the group
# itself is gone by the time they are written.
SEEN: dict[str, str] = {}

# Every group finish() left, kept referenced until the process ends with os._exit (attempt/worker.py,
# attempt/zygote.py), so that its destructor never runs. Freeing a gloo group can deadlock: its
# destructor joins gloo's worker thread while holding the GIL, and that thread may still need the
# GIL to drop the tensors of the last collective (pytorch/pytorch#75097, #56297). The last reference
# is DDP's Reducer inside the trainer, freed wherever the trainer goes: a rank then never exits, and
# every node's torchrun waits for it (seen in ~1 of 20 two-node runs; py-spy: ~ProcessGroupGloo in
# std::thread::join on the main thread, gloo's runLoop in decref_pyobject waiting for the GIL).
KEPT_GROUPS: list[object] = []


def finish() -> None:
    """After training: wait for every rank, then leave the process group, so that rank 0's gate (which
    runs alone and can take minutes) leaves no rank blocked in a collective with a timeout ticking."""
    if _group_ready():
        import torch.distributed as dist

        SEEN["backend"] = str(dist.get_backend())
        dist.barrier()
        KEPT_GROUPS.append(dist.group.WORLD)
        dist.destroy_process_group()
