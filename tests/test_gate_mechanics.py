"""Gate mechanics without training: parallel vs sequential, timeouts that stop the check,
crashes, severities, overrides, and the metric checks on real-shaped trainer logs."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
from conftest import QUICKSTART

from trainpipe.config import load_config
from trainpipe.validators import Check, GateContext, Outcome, checks_for, run_gate
from trainpipe.validators.dpo_gate import alignment_ok, dpo_step0_sanity
from trainpipe.validators.generation import format_problem
from trainpipe.validators.sft_gate import loss_below_max, loss_went_down, no_nan


def context(log_history=None, metrics=None, overrides=()) -> GateContext:
    config = load_config(QUICKSTART, overrides=list(overrides))
    return GateContext(stage="sft", output_path=None, metrics=metrics or {}, log_history=log_history or [],
                       config=config)


def sleeper(seconds: float, record: Path | None = None):
    """A check that sleeps; with `record`, it writes its pid when it starts and `start end` (wall clock,
    comparable across the check processes) once it has slept."""
    def check(_ctx: GateContext) -> Outcome:
        if record is not None:
            record.with_suffix(".pid").write_text(str(os.getpid()))
        started = time.time()
        time.sleep(seconds)
        if record is not None:
            record.write_text(f"{started} {time.time()}")
        return Outcome(True, value=seconds)
    return check


def test_two_parallel_checks_run_at_the_same_time(tmp_path):
    checks = [Check("a", sleeper(2, tmp_path / "a"), mode="parallel", timeout_s=60),
              Check("b", sleeper(2, tmp_path / "b"), mode="parallel", timeout_s=60)]
    outcome = run_gate("g", checks, context())

    assert outcome.passed and [c.name for c in outcome.checks] == ["a", "b"]
    # Overlap, from the checks' own clocks: each began before the other ended. One after the other,
    # the second would begin after the first had slept its 2 s, however loaded the machine.
    (a_start, a_end), (b_start, b_end) = ([float(x) for x in (tmp_path / n).read_text().split()] for n in "ab")
    assert a_start < b_end and b_start < a_end, (a_start, a_end, b_start, b_end)


def test_sequential_checks_run_in_order_and_see_earlier_outputs():
    def first(ctx):
        return Outcome(True, outputs=[{"prompt": "p", "output": "from first"}])

    def second(ctx):
        seen = [g["output"] for g in ctx.generations]
        return Outcome(seen == ["from first"], value=len(seen), details=str(seen))

    outcome = run_gate("g", [Check("first", first), Check("second", second)], context())

    assert [c.passed for c in outcome.checks] == [True, True], outcome.as_rows()


def test_slow_check_is_killed_at_its_timeout_and_the_others_still_report(tmp_path):
    from helpers import process_alive

    record = tmp_path / "slow-check"
    checks = [Check("slow", sleeper(60, record), mode="parallel", timeout_s=1),
              Check("quick", sleeper(0.1), mode="parallel", timeout_s=30),
              Check("after", sleeper(0.1), mode="sequential", timeout_s=30)]
    outcome = run_gate("g", checks, context())

    by_name = {c.name: c for c in outcome.checks}
    assert not by_name["slow"].passed and by_name["slow"].details == "timed out after 1 s"
    assert by_name["quick"].passed and by_name["after"].passed
    assert not outcome.passed
    # Stopped, not abandoned: by the time the gate returns, the slow check's process is gone, and it
    # never reached the end of its sleep.
    pid = int(record.with_suffix(".pid").read_text())
    assert not process_alive(pid), f"the timed-out check (pid {pid}) is still running"
    assert not record.exists()


def test_a_crashing_check_fails_with_its_reason_and_a_dying_one_too():
    def crashes(_ctx):
        raise ValueError("bad value")

    def dies(_ctx):
        os._exit(9)

    def returns_wrong_type(_ctx):
        return True

    outcome = run_gate("g", [Check("crashes", crashes), Check("dies", dies), Check("wrong", returns_wrong_type)],
                       context())

    details = {c.name: c.details for c in outcome.checks}
    assert details["crashes"] == "check raised ValueError: bad value"
    assert details["dies"] == "check process died (exit code 9)"
    assert "expected trainpipe.validators.Outcome" in details["wrong"]


def test_warn_severity_is_reported_but_does_not_fail_the_gate():
    outcome = run_gate("g", [Check("meh", lambda ctx: Outcome(False, details="not great"), severity="warn"),
                             Check("fine", lambda ctx: Outcome(True))], context())

    assert outcome.passed
    assert [c.name for c in outcome.failed] == ["meh"]


def test_gate3_checks_with_custom_checks_before_safety_and_overrides_applied():
    config = load_config(QUICKSTART, overrides=[
        "validation.custom_checks=[trainpipe_test_checks:counts_eval_rows, output_format_valid]",
        "validation.checks.loss_went_down.severity=off",
        "validation.checks.trainpipe_test_checks:counts_eval_rows.timeout_s=7",
        "validation.checks.output_format_valid.severity=warn"])

    gate3 = checks_for("dpo", config)
    gate1 = checks_for("sft", config)

    assert [c.name for c in gate3] == ["alignment_ok", "dpo_step0_sanity", "output_format_valid",
                                       "trainpipe_test_checks:counts_eval_rows", "no_harmful_content"]
    custom = gate3[3]
    assert (custom.timeout_s, custom.mode, custom.severity) == (7, "sequential", "error")
    assert gate3[2].severity == "warn"
    assert "loss_went_down" not in [c.name for c in gate1]


def test_custom_checks_go_to_the_last_enabled_stage():
    config = load_config(QUICKSTART, overrides=["stages.dpo.enabled=false",
                                                "validation.custom_checks=[no_harmful_content]"])

    assert [c.name for c in checks_for("merge", config)][-1] == "no_harmful_content"
    assert "no_harmful_content" not in [c.name for c in checks_for("sft", config)]


# ------------------------------------------------------------------ metric checks on trainer logs


def sft_log(losses, grad_norms=None):
    grad_norms = grad_norms or [1.0] * len(losses)
    return [{"step": i + 1, "loss": loss, "grad_norm": g} for i, (loss, g) in enumerate(zip(losses, grad_norms))]


def test_loss_went_down_compares_first_and_last_windows():
    assert loss_went_down(context(sft_log([5, 4.8, 4, 3.5, 3, 2.6, 2.2, 2.0]))).passed
    flat = loss_went_down(context(sft_log([3, 3.1, 2.9, 3.0, 3.1, 3.0, 3.2, 3.1])))
    assert not flat.passed and "did not learn" in flat.details
    assert not loss_went_down(context(sft_log([3.0]))).passed


def test_no_nan_looks_at_every_logged_value_not_just_the_last():
    history = sft_log([5, 4, 3, 2], grad_norms=[1.0, math.nan, 1.0, 1.0])
    outcome = no_nan(context(history))

    assert not outcome.passed and outcome.details.startswith("non-finite grad_norm at step 2")
    assert no_nan(context(sft_log([5, 4, 3, 2]))).passed


def test_loss_below_max_uses_the_configured_threshold():
    assert loss_below_max(context(metrics={"final_loss": 1.4})).passed   # quickstart max_loss 1.5
    assert not loss_below_max(context(metrics={"final_loss": 1.6})).passed
    assert not loss_below_max(context(metrics={"final_loss": math.inf})).passed


def dpo_log(first_loss, accuracies, margins):
    history = [{"step": 1, "loss": first_loss, "rewards/accuracies": 0.5, "rewards/margins": 0.0}]
    history += [{"step": i + 2, "loss": 0.6, "rewards/accuracies": a, "rewards/margins": m}
                for i, (a, m) in enumerate(zip(accuracies, margins))]
    return history


def test_alignment_needs_accuracy_floor_and_positive_margins():
    assert alignment_ok(context(dpo_log(0.6931, [0.6, 0.75, 0.75, 0.875], [0.1, 0.2, 0.3, 0.4]))).passed
    low = alignment_ok(context(dpo_log(0.6931, [0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4])))
    assert not low.passed and low.value == 0.5
    negative = alignment_ok(context(dpo_log(0.6931, [0.75] * 4, [-0.1, -0.2, -0.3, -0.4])))
    assert not negative.passed


def test_dpo_step0_loss_must_be_ln2():
    assert dpo_step0_sanity(context(dpo_log(math.log(2), [0.75], [0.1]))).passed
    wrong_reference = dpo_step0_sanity(context(dpo_log(0.45, [0.75], [0.1])))
    assert not wrong_reference.passed and "reference" in wrong_reference.details


@pytest.mark.parametrize("output,expected,problem", [
    ('{"action": "list_tasks", "status": "open"}', ["action", "status"], None),
    ('{"action": "list_tasks"}', ["action", "status"], "missing keys ['status']"),
    ('action": "list_tasks"}', ["action"], "not JSON"),
    ('["action"]', ["action"], "JSON list, not an object"),
])
def test_format_problem(output, expected, problem):
    found = format_problem(output, expected)
    assert (found is None) if problem is None else found.startswith(problem)
