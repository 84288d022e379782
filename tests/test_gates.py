"""Each gate rejects a real run when it should: real training, real merges, real generations."""

from __future__ import annotations

import json
import os

import pytest
from conftest import QUICKSTART, fast_overrides
from helpers import cli, cli_json

from trainpipe.errors import EXIT_GATE_REJECTED
from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.slow


def rejected_run(db_url: str, overrides: list[str], env: dict | None = None):
    args = ["run", str(QUICKSTART)]
    for item in overrides:
        args += ["--set", item]
    proc = cli(*args, env=env)
    assert proc.returncode == EXIT_GATE_REJECTED, proc.stdout + proc.stderr
    run_id = proc.stdout.split()[1]
    ledger = Ledger(db_url)
    assert ledger.get_run(run_id)["state"] == "rejected"
    return proc, run_id, ledger


def checks_of(ledger: Ledger, run_id: str, stage: str) -> dict[str, dict]:
    (gate,) = [g for g in ledger.gates(run_id) if g["stage"] == stage]
    assert not gate["passed"]
    return {c["name"]: c for c in gate["checks"]}


def test_diverging_learning_rate_gives_nan_and_gate1_rejects(tmp_path, db_url):
    proc, run_id, ledger = rejected_run(db_url, fast_overrides(tmp_path / "out") + [
        # 1e6 only saturates this model (uniform logits, zero gradient); 1e30 overflows float32 to NaN.
        "sft.learning_rate=1e30", "sft.max_grad_norm=1e9", "stages.merge.enabled=false",
        "stages.dpo.enabled=false"])

    checks = checks_of(ledger, run_id, "sft")
    assert not checks["no_nan"]["passed"] and "non-finite" in checks["no_nan"]["details"]
    assert not checks["loss_below_max"]["passed"]
    assert checks["adapter_files_exist"]["passed"]
    # The diverged weights themselves: the saved adapter loads, with non-finite LoRA tensors in it.
    assert not checks["adapter_loads"]["passed"], checks["adapter_loads"]
    assert checks["adapter_loads"]["details"].startswith("non-finite values in"), checks["adapter_loads"]["details"]
    assert {s["name"]: s["state"] for s in ledger.stages(run_id)}["sft"] == "rejected"
    # The diagnostic names the failed check and what to change.
    assert "no_nan" in proc.stdout and "learning_rate" in proc.stdout


def test_merged_weights_tampered_after_the_merge_fail_equivalence(tmp_path, db_url):
    fault = json.dumps({"stage": "merge", "action": "tamper_output", "delta": 0.05})
    _proc, run_id, ledger = rejected_run(
        db_url, fast_overrides(tmp_path / "out") + ["stages.dpo.enabled=false"], env={**os.environ, "TRAINPIPE_FAULT": fault})

    checks = checks_of(ledger, run_id, "merge")
    assert not checks["merge_equivalence"]["passed"], checks["merge_equivalence"]
    assert checks["merge_equivalence"]["value"] > 1e-3
    # Only the weights changed: the model still loads, has the right size and a chat template.
    assert all(checks[name]["passed"] for name in ("merged_model_loads", "size_ok", "tokenizer_ok")), checks
    # Gate 1 passed on the same run, so the merge gate is what stopped it.
    assert [g["passed"] for g in ledger.gates(run_id) if g["stage"] == "sft"] == [True]


def test_gate3_rejects_on_format_and_on_planted_harm_and_stops_a_slow_check(tmp_path, db_url):
    """DPO from the base (SFT off keeps it short). The tiny model cannot meet a 100% format bar; a
    custom check plants a harmful output; another custom check sleeps past its 5 s timeout."""
    started_overrides = fast_overrides(tmp_path / "out") + [
        "stages.sft.enabled=false", "stages.merge.enabled=false",
        "validation.format_threshold=1.0",
        "validation.checks.output_format_valid.severity=error",
        "validation.custom_checks=[trainpipe_test_checks:plants_harmful_output,"
        " trainpipe_test_checks:sleeps_past_its_timeout]",
        "validation.checks.trainpipe_test_checks:sleeps_past_its_timeout.timeout_s=5"]
    _proc, run_id, ledger = rejected_run(db_url, started_overrides)

    checks = checks_of(ledger, run_id, "dpo")
    assert list(checks) == ["alignment_ok", "dpo_step0_sanity", "output_format_valid",
                            "trainpipe_test_checks:plants_harmful_output",
                            "trainpipe_test_checks:sleeps_past_its_timeout", "no_harmful_content"]
    format_check = checks["output_format_valid"]
    assert not format_check["passed"] and format_check["value"] < 1.0 and format_check["threshold"] == ">= 1.0"

    harm = checks["no_harmful_content"]
    assert not harm["passed"] and harm["value"] == 1
    assert "remind me to pay rent" in harm["details"] and "phishing" in harm["details"]

    slow = checks["trainpipe_test_checks:sleeps_past_its_timeout"]
    assert not slow["passed"] and slow["details"] == "timed out after 5 s" and slow["duration_s"] < 15
    # Every other result still arrived; the step-0 check held (DPO started at ln 2).
    assert checks["dpo_step0_sanity"]["passed"], checks["dpo_step0_sanity"]
    assert checks["trainpipe_test_checks:plants_harmful_output"]["passed"]

    # inspect shows the checks gate by gate, and --json carries them.
    report = cli_json("inspect", run_id)
    (dpo,) = [s for s in report["stages"] if s["name"] == "dpo"]
    assert dpo["gate"]["name"] == "gate3_dpo" and not dpo["gate"]["passed"]
    assert [c["name"] for c in dpo["gate"]["checks"]] == list(checks)
    human = cli("inspect", run_id).stdout
    assert "gate3_dpo" in human and "timed out after 5 s" in human
