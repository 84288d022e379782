"""How many CPU cores this process may use: its affinity, which taskset and cgroups narrow, not the
machine's count. Read by the parallel hashing (checkpoints.py), a CPU sweep's thread share
(engine/sweep.py) and torchrun's `nproc_per_node: auto` (engine/identity.py)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
