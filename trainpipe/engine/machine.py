"""The run and stage state machines, as plain data.

The ledger stores the state; these tables decide which triggers are legal. `next_state` builds a
throwaway `transitions` machine at the stored state, fires the trigger and reports where it landed,
so the ledger can write the new state and the transition row in one database transaction.
"""

from __future__ import annotations

from enum import Enum

from transitions import Machine, MachineError

from trainpipe.errors import IllegalTransition


class RunState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    REJECTED = "rejected"
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"


class StageState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    VALIDATING = "validating"
    PASSED = "passed"
    FAILED = "failed"
    REJECTED = "rejected"
    SKIPPED = "skipped"
    CACHED = "cached"


RUN_TRANSITIONS = [
    {"trigger": "start", "source": "pending", "dest": "running"},
    {"trigger": "succeed", "source": "running", "dest": "succeeded"},
    {"trigger": "fail", "source": "running", "dest": "failed"},
    {"trigger": "reject", "source": "running", "dest": "rejected"},
    # Ctrl-C, SIGTERM, or an owner found dead by `status`/`resume`.
    {"trigger": "interrupt", "source": "running", "dest": "interrupted"},
    {"trigger": "resume", "source": ["interrupted", "failed"], "dest": "running"},
    {"trigger": "cancel", "source": ["pending", "interrupted", "failed"], "dest": "cancelled"},
]

STAGE_TRANSITIONS = [
    # A retry or a resume starts a failed stage again; each start opens a new attempt.
    {"trigger": "start", "source": ["pending", "failed"], "dest": "running"},
    {"trigger": "validate", "source": "running", "dest": "validating"},
    {"trigger": "pass_gate", "source": "validating", "dest": "passed"},
    {"trigger": "reject", "source": "validating", "dest": "rejected"},
    # `fail` also covers an attempt abandoned because its owner died mid-stage.
    {"trigger": "fail", "source": ["running", "validating"], "dest": "failed"},
    {"trigger": "skip", "source": "pending", "dest": "skipped"},
    {"trigger": "reuse_cached", "source": "pending", "dest": "cached"},
]

RUN_FINAL = {RunState.SUCCEEDED, RunState.REJECTED, RunState.CANCELLED}
RUN_RESUMABLE = {RunState.INTERRUPTED, RunState.FAILED}
STAGE_DONE = {StageState.PASSED, StageState.SKIPPED, StageState.CACHED}

_TABLES = {
    "run": ([s.value for s in RunState], RUN_TRANSITIONS),
    "stage": ([s.value for s in StageState], STAGE_TRANSITIONS),
}


class _Subject:
    state: str


def next_state(kind: str, current: str, trigger: str) -> str:
    """Where `trigger` takes a run or stage from `current`; IllegalTransition if it may not fire there."""
    states, table = _TABLES[kind]
    subject = _Subject()
    machine = Machine(model=subject, states=states, transitions=table, initial=current,
                      auto_transitions=False, send_event=False)
    try:
        if trigger not in machine.get_triggers(current):
            raise MachineError(f"'{trigger}' is not allowed from '{current}'")
        subject.trigger(trigger)  # type: ignore[attr-defined]
    except (MachineError, AttributeError):
        allowed = ", ".join(machine.get_triggers(current)) or "none"
        raise IllegalTransition(
            f"cannot {trigger} a {kind} that is {current} (allowed from {current}: {allowed})"
        ) from None
    return subject.state


def mermaid(kind: str) -> str:
    """The `kind` ("run" or "stage") machine as a Mermaid state diagram, drawn from the table above
    (`trainpipe inspect --graph`), so the picture cannot drift from what the code enforces."""
    states, table = _TABLES[kind]
    final = {s.value for s in RUN_FINAL} if kind == "run" else {"passed", "rejected", "skipped", "cached"}
    lines = ["stateDiagram-v2", f"    [*] --> {states[0]}"]
    for row in table:
        sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
        lines += [f"    {source} --> {row['dest']}: {row['trigger']}" for source in sources]
    lines += [f"    {state} --> [*]" for state in states if state in final]
    return "\n".join(lines)


def advance(kind: str, trigger: str):
    """The ledger's compare-and-set takes the next state as a function of the current one."""
    return lambda current: next_state(kind, current, trigger)
