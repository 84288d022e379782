"""`trainpipe join RUN_ID --node-rank K`: a node other than node 0 of a multi-node (`nnodes > 1`) stage.

The run has one orchestrator, on node 0: it owns the ledger rows, the retries, the gates and the
timeouts. Every other node runs this follower, which records nothing. It watches the ledger for
the run's open attempts of stages whose launcher spans several nodes, and starts its own torchrun
for each one with the attempt's spec (on storage all nodes share, like the run dir itself): the
ranks meet at node 0's `rdzv_endpoint`. Those ranks are never global rank 0, so they train and
exit; a rank that raises writes result-N.rankR.json beside rank 0's result, which the orchestrator
reads. When the orchestrator gives up on an attempt (timeout, stop), its ranks vanish and this
node's ranks lose their peers; a follower whose torchrun outlives its attempt by the grace period
kills it. Imports neither torch nor rich: the ranks are torchrun's processes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainpipe.engine.stage_process import Torchrun
from trainpipe.engine.supervisor import TERM_GRACE_S
from trainpipe.errors import TrainpipeError
from trainpipe.store.reader import LedgerReader

POLL_S = 0.5
SPEC_WAIT_S = 60.0
FINISHED_RUN_STATES = {"succeeded", "failed", "rejected", "cancelled"}


@dataclass
class FollowResult:
    run_state: str
    attempts: list[dict[str, Any]] = field(default_factory=list)  # {stage, attempt, exit_code}


def multi_node_stages(config_snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """stage name -> its launcher settings, for the stages that run on more than one node."""
    stages = {}
    for name in ("sft", "dpo"):
        launcher = (config_snapshot.get(name) or {}).get("launcher")
        if launcher and int(launcher.get("nnodes") or 1) > 1:
            stages[name] = launcher
    return stages


def follow(ledger: LedgerReader, run_id: str, node_rank: int, *, note: Callable[[str], None] = print,
           exit_when_interrupted: bool = False) -> FollowResult:
    """Serve the run's multi-node attempts from this node until the run finishes (or, with
    `exit_when_interrupted`, stops being driven). A resumed run is followed on: its new attempts
    are new rows."""
    run = ledger.get_run(run_id)
    stages = multi_node_stages(run["config_snapshot"])
    if not stages:
        raise TrainpipeError(f"run {run_id} has no stage that spans several nodes (no launcher with nnodes > 1)",
                             hint="only sft.launcher / dpo.launcher with nnodes > 1 need `trainpipe join`")
    for name, launcher in stages.items():
        if not 1 <= node_rank < int(launcher["nnodes"]):
            raise TrainpipeError(f"--node-rank {node_rank} is outside 1..{int(launcher['nnodes']) - 1} for stage "
                                 f"{name} (nnodes {launcher['nnodes']}; node 0 is the orchestrator's)")
    note(f"joined run {run_id} as node {node_rank} for {', '.join(sorted(stages))}")
    served: set[int] = set()
    result = FollowResult(run_state=run["state"])
    while True:
        state = ledger.get_run(run_id)["state"]
        result.run_state = state
        if state in FINISHED_RUN_STATES or (exit_when_interrupted and state == "interrupted"):
            return result
        for attempt in ledger.attempts(run_id):
            if attempt["outcome"] != "running" or attempt["stage"] not in stages or attempt["id"] in served:
                continue
            served.add(attempt["id"])
            code = _serve(ledger, run, attempt, stages[attempt["stage"]], node_rank, note)
            result.attempts.append({"stage": attempt["stage"], "attempt": attempt["attempt"], "exit_code": code})
        time.sleep(POLL_S)


def _serve(ledger: LedgerReader, run: dict[str, Any], attempt: dict[str, Any], launcher: dict[str, Any],
           node_rank: int, note: Callable[[str], None]) -> int:
    """This node's torchrun for one attempt, to its end; its exit code (negative: killed by that signal)."""
    work_dir = Path(run["run_dir"]) / ".work" / attempt["stage"]
    spec_path = work_dir / f"spec-{attempt['attempt']}.json"
    # Node 0 opens the attempt's ledger row before it writes the spec, and shared storage may show a
    # new file late.
    deadline = time.monotonic() + SPEC_WAIT_S
    while not spec_path.is_file():
        if time.monotonic() > deadline:
            raise TrainpipeError(f"{spec_path} is not visible from this node after {SPEC_WAIT_S:.0f} s",
                                 hint="the run dir (output_dir) must be on storage every node shares")
        time.sleep(POLL_S)
    launcher = json.loads(spec_path.read_text(encoding="utf-8"))["config"][attempt["stage"]]["launcher"] or launcher
    log_path = work_dir / f"stage-node{node_rank}.log"
    note(f"{attempt['stage']}: attempt {attempt['attempt']}: starting torchrun for node {node_rank} (log: {log_path})")
    proc = Torchrun(launcher, spec_path, log_path, {**os.environ, "PYTHONUNBUFFERED": "1"}, node_rank=node_rank)
    ended_at: float | None = None
    term_sent = False
    while (code := proc.poll()) is None:
        if ended_at is None and _attempt_closed(ledger, run["run_id"], attempt["id"]):
            ended_at = time.monotonic()
        if ended_at is not None:
            # Node 0 stopped this attempt: its ranks are gone or going, and ours would wait for them.
            waited = time.monotonic() - ended_at
            if not term_sent and waited > TERM_GRACE_S / 2:
                proc.signal_group(signal.SIGTERM)
                term_sent = True
            elif waited > TERM_GRACE_S:
                proc.signal_group(signal.SIGKILL)
        time.sleep(POLL_S)
    note(f"{attempt['stage']}: attempt {attempt['attempt']}: node {node_rank}'s torchrun exited with {code}")
    return code


# An attempt is `validating` from the moment rank 0's output is recorded until node 0's torchrun
# exits after the gate; the other nodes' torchruns must be left alone until then, or node 0's waits
# for them at torchrun's exit barrier (300 s).
_OPEN_OUTCOMES = {"running", "validating"}


def _attempt_closed(ledger: LedgerReader, run_id: str, attempt_id: int) -> bool:
    return any(a["id"] == attempt_id and a["outcome"] not in _OPEN_OUTCOMES for a in ledger.attempts(run_id))
