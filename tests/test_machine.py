"""The run and stage state machines: which triggers fire from where, and that nothing else does."""

from __future__ import annotations

from collections import deque

import pytest

from trainpipe.engine.machine import (
    RUN_TRANSITIONS,
    STAGE_TRANSITIONS,
    RunState,
    StageState,
    next_state,
)
from trainpipe.errors import EXIT_USAGE, IllegalTransition


def _edges(table: list[dict]) -> dict[str, dict[str, str]]:
    """state -> {trigger: dest}, from the plain-data table."""
    edges: dict[str, dict[str, str]] = {}
    for row in table:
        sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
        for source in sources:
            assert row["trigger"] not in edges.get(source, {}), f"{row['trigger']} twice from {source}"
            edges.setdefault(source, {})[row["trigger"]] = row["dest"]
    return edges


def _reachable(table: list[dict], start: str) -> dict[str, list[str]]:
    """Every state reachable from `start`, with the trigger path that first reaches it."""
    edges = _edges(table)
    paths = {start: []}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        for trigger, dest in edges.get(state, {}).items():
            if dest not in paths:
                paths[dest] = paths[state] + [trigger]
                queue.append(dest)
    return paths


# ------------------------------------------------------------------ run table


@pytest.mark.parametrize(("current", "trigger", "expected"), [
    ("pending", "start", "running"),
    ("running", "succeed", "succeeded"),
    ("running", "fail", "failed"),
    ("running", "reject", "rejected"),
    ("running", "interrupt", "interrupted"),
    ("interrupted", "resume", "running"),
    ("failed", "resume", "running"),
    ("pending", "cancel", "cancelled"),
    ("interrupted", "cancel", "cancelled"),
    ("failed", "cancel", "cancelled"),
])
def test_run_legal_triggers(current: str, trigger: str, expected: str) -> None:
    assert next_state("run", current, trigger) == expected


@pytest.mark.parametrize(("current", "trigger"), [
    ("succeeded", "resume"),
    ("rejected", "resume"),
    ("cancelled", "resume"),
    ("pending", "resume"),
    ("running", "resume"),
    ("running", "start"),
    ("succeeded", "start"),
    ("interrupted", "start"),
    ("pending", "succeed"),
    ("succeeded", "fail"),
    ("succeeded", "cancel"),
    ("running", "cancel"),
    ("pending", "interrupt"),
    ("pending", "no_such_trigger"),
])
def test_run_illegal_triggers(current: str, trigger: str) -> None:
    with pytest.raises(IllegalTransition) as info:
        next_state("run", current, trigger)
    assert info.value.exit_code == EXIT_USAGE == 2
    assert info.value.message.startswith(f"cannot {trigger} a run that is {current}")


def test_illegal_run_trigger_lists_what_is_allowed() -> None:
    with pytest.raises(IllegalTransition) as info:
        next_state("run", "succeeded", "resume")
    assert info.value.message == "cannot resume a run that is succeeded (allowed from succeeded: none)"

    with pytest.raises(IllegalTransition) as info:
        next_state("run", "failed", "start")
    allowed = info.value.message.split("allowed from failed: ", 1)[1].rstrip(")")
    assert sorted(allowed.split(", ")) == ["cancel", "resume"]


# ------------------------------------------------------------------ stage table


@pytest.mark.parametrize(("current", "trigger", "expected"), [
    ("pending", "start", "running"),
    ("failed", "start", "running"),
    ("running", "validate", "validating"),
    ("validating", "pass_gate", "passed"),
    ("validating", "reject", "rejected"),
    ("running", "fail", "failed"),
    ("validating", "fail", "failed"),
    ("pending", "skip", "skipped"),
    ("pending", "reuse_cached", "cached"),
])
def test_stage_legal_triggers(current: str, trigger: str, expected: str) -> None:
    assert next_state("stage", current, trigger) == expected


@pytest.mark.parametrize(("current", "trigger"), [
    ("pending", "pass_gate"),
    ("running", "pass_gate"),
    ("passed", "pass_gate"),
    ("failed", "pass_gate"),
    ("pending", "validate"),
    ("pending", "reject"),
    ("running", "reject"),
    ("passed", "start"),
    ("rejected", "start"),
    ("running", "start"),
    ("skipped", "start"),
    ("cached", "start"),
    ("pending", "fail"),
    ("running", "skip"),
    ("failed", "reuse_cached"),
])
def test_stage_illegal_triggers(current: str, trigger: str) -> None:
    with pytest.raises(IllegalTransition) as info:
        next_state("stage", current, trigger)
    assert info.value.exit_code == 2
    assert info.value.message.startswith(f"cannot {trigger} a stage that is {current}")


def test_pass_gate_fires_only_from_validating() -> None:
    legal = []
    for state in StageState:
        try:
            next_state("stage", state.value, "pass_gate")
        except IllegalTransition:
            continue
        legal.append(state.value)
    assert legal == ["validating"]


# ------------------------------------------------------------------ the graphs


def test_every_run_state_is_reachable_from_pending() -> None:
    paths = _reachable(RUN_TRANSITIONS, "pending")

    assert set(paths) == {s.value for s in RunState}
    # each path really walks through next_state
    for target, triggers in paths.items():
        state = "pending"
        for trigger in triggers:
            state = next_state("run", state, trigger)
        assert state == target


def test_every_stage_state_is_reachable_from_pending() -> None:
    paths = _reachable(STAGE_TRANSITIONS, "pending")

    assert set(paths) == {s.value for s in StageState}
    assert paths["cached"] == ["reuse_cached"]
    for target, triggers in paths.items():
        state = "pending"
        for trigger in triggers:
            state = next_state("stage", state, trigger)
        assert state == target


def test_tables_name_only_known_states() -> None:
    for table, states in ((RUN_TRANSITIONS, RunState), (STAGE_TRANSITIONS, StageState)):
        known = {s.value for s in states}
        for row in table:
            sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
            assert set(sources) <= known, row
            assert row["dest"] in known, row


def test_final_run_states_have_no_way_out() -> None:
    edges = _edges(RUN_TRANSITIONS)
    for final in ("succeeded", "rejected", "cancelled"):
        assert final not in edges
        for trigger in {row["trigger"] for row in RUN_TRANSITIONS}:
            with pytest.raises(IllegalTransition):
                next_state("run", final, trigger)


# ------------------------------------------------------------------ no auto transitions


@pytest.mark.parametrize(("kind", "current", "trigger"), [
    ("run", "pending", "to_succeeded"),
    ("run", "running", "to_succeeded"),
    ("run", "succeeded", "to_running"),
    ("stage", "pending", "to_passed"),
    ("stage", "failed", "to_cached"),
])
def test_auto_transitions_are_off(kind: str, current: str, trigger: str) -> None:
    with pytest.raises(IllegalTransition):
        next_state(kind, current, trigger)
