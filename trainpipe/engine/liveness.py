"""Finding runs whose owner is gone. A run marked `running` whose owning process died (SIGKILL,
OOM killer, a lost machine) must show as `interrupted`, never as `running` forever."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from trainpipe.store.reader import HOST, LedgerReader, StaleState

if TYPE_CHECKING:
    from trainpipe.store.ledger import Ledger

# A heartbeat older than this means the owner is gone even if we cannot see its pid (another host).
STALE_AFTER_S = float(os.environ.get("TRAINPIPE_STALE_AFTER_S", "120"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (dead, not yet reaped by its parent) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def owner_gone(run: dict[str, Any], now: float) -> str | None:
    """Why the run's owner is considered dead, or None if it may be alive."""
    pid, host, beat = run.get("owner_pid"), run.get("owner_host"), run.get("heartbeat_at")
    if pid is None:
        return "no owner recorded"
    if host == HOST and not pid_alive(pid):
        return f"owner pid {pid} on {host} is gone"
    if beat is not None and now - beat > STALE_AFTER_S:
        return f"no heartbeat from pid {pid} on {host} for {now - beat:.0f} s"
    return None


def mark_if_abandoned(ledger: LedgerReader | Ledger, run: dict[str, Any], now: float) -> bool:
    """Compare-and-set a dead owner's run to `interrupted`; True if this call did it."""
    if run["state"] != "running":
        return False
    reason = owner_gone(run, now)
    if reason is None:
        return False
    return mark_abandoned(ledger, run, reason)


def mark_abandoned(ledger: LedgerReader | Ledger, run: dict[str, Any], reason: str) -> bool:
    """Compare-and-set a `running` run whose owner is known to be dead to `interrupted`, with `reason`;
    its open attempts and stages fail. True if this call did it."""
    from trainpipe.engine.machine import next_state  # `transitions` too is for the rare write only
    from trainpipe.store.opening import writable

    ledger = writable(ledger)  # `status` reads without SQLAlchemy; this rare write needs it
    try:
        ledger.transition_run(run["run_id"], "interrupt", lambda cur: next_state("run", cur, "interrupt"),
                              detail={"reason": reason}, expect_state="running", clear_owner=True)
    except StaleState:
        return False  # someone else already acted on it
    ledger.close_open_attempts(run["run_id"], "interrupted", reason)
    for stage in ledger.stages(run["run_id"]):
        if stage["state"] in ("running", "validating"):
            ledger.transition_stage(run["run_id"], stage["name"], "fail",
                                    lambda cur: next_state("stage", cur, "fail"), detail={"reason": reason})
    return True


def reconcile(ledger: LedgerReader | Ledger, runs: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """Mark abandoned runs interrupted; return the runs with their current states."""
    return [ledger.get_run(run["run_id"]) if mark_if_abandoned(ledger, run, now) else run for run in runs]
