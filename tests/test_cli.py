"""The `trainpipe` command: exit codes, one-line errors, and what status/inspect report.

Exit codes come from `main()`, so those tests run the real console entry point in a subprocess.
Nothing here trains a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainpipe.cli.app import app
from trainpipe.engine.machine import next_state
from trainpipe.store.ledger import Ledger

runner = CliRunner()

# A guard, not a timing assertion: an in-process `run` whose bad input stopped being caught would start training.
pytestmark = pytest.mark.timeout(120)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainpipe.cli.app", *args], capture_output=True, text=True,
                          cwd=cwd, env=os.environ.copy(), timeout=120)


def assert_clean_usage_error(proc: subprocess.CompletedProcess) -> None:
    """Exit 2 with a one-line `error:` on stderr and no traceback anywhere."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("error: "), proc.stderr


def fsm(kind: str, trigger: str):
    return lambda current: next_state(kind, current, trigger)


def count_runs() -> int:
    ledger = Ledger()  # TRAINPIPE_DB, set per test by conftest
    try:
        return ledger.count_runs()
    finally:
        ledger.close()


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def ledger():
    ledger = Ledger()
    yield ledger
    ledger.close()


def make_run(ledger: Ledger, tmp_path: Path, run_id: str = "lesson-20250101-000000-abcd") -> str:
    ledger.create_run(run_id=run_id, pipeline_id="lesson", config_snapshot={"pipeline_id": "lesson"},
                      config_path=None, output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "out" / run_id),
                      stages=["sft", "merge", "dpo"])
    return run_id


LESSON_RUN = ("run", "configs/pipeline_config.yaml", "--sft-dataset", "sft.jsonl",
              "--preference-dataset", "preference.jsonl")


# ------------------------------------------------------------------ run: bad input exits 2 and writes no run


def test_run_with_bad_config_exits_2_and_writes_no_run(lesson_dir: Path) -> None:
    sft_file = lesson_dir / "configs" / "sft_config.yaml"
    sft_file.write_text(sft_file.read_text(encoding="utf-8") + "lerning_rate: 1.0e-4\n", encoding="utf-8")

    proc = cli(*LESSON_RUN, cwd=lesson_dir)

    assert_clean_usage_error(proc)
    assert f"{sft_file.resolve()}: unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in proc.stderr
    assert count_runs() == 0
    assert not (lesson_dir / "artifacts").exists()


def test_run_with_bad_set_exits_2(lesson_dir: Path, trainpipe) -> None:
    proc = trainpipe(*LESSON_RUN, "--set", "validation.max_los=3")

    assert_clean_usage_error(proc)
    assert "--set validation.max_los=3: unknown key 'validation.max_los' (did you mean 'max_loss'?)" in proc.stderr
    assert count_runs() == 0


def test_run_with_missing_config_file_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trainpipe) -> None:
    monkeypatch.chdir(tmp_path)
    proc = trainpipe("run", "nope.yaml")

    assert_clean_usage_error(proc)
    assert "nope.yaml: pipeline config not found" in proc.stderr
    assert count_runs() == 0


def test_run_with_bad_dataset_row_exits_2_and_writes_no_run(lesson_dir: Path) -> None:
    rows = (lesson_dir / "preference.jsonl").read_text(encoding="utf-8").splitlines()
    third = json.loads(rows[2])
    del third["chosen"]
    rows[2] = json.dumps(third)
    bad = lesson_dir / "bad_pref.jsonl"
    bad.write_text("\n".join(rows) + "\n", encoding="utf-8")

    proc = cli("run", "configs/pipeline_config.yaml", "--sft-dataset", "sft.jsonl",
               "--preference-dataset", "bad_pref.jsonl", cwd=lesson_dir)

    assert_clean_usage_error(proc)
    assert f"{bad.resolve()}:3: missing field 'chosen'" in proc.stderr
    assert count_runs() == 0
    assert not (lesson_dir / "artifacts").exists()



def test_usage_error_exits_2(tmp_path: Path) -> None:
    proc = cli("run", cwd=tmp_path)  # missing CONFIG argument

    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2
    assert "Missing argument" in proc.stderr


def test_unknown_option_exits_2(trainpipe) -> None:
    proc = trainpipe("status", "--bogus")

    assert proc.returncode == 2
    assert "No such option: --bogus" in proc.stderr


def test_no_arguments_prints_help(trainpipe) -> None:
    proc = trainpipe()

    assert proc.returncode in (0, 2)
    assert "Usage" in proc.stdout + proc.stderr


def test_help_exits_0(trainpipe) -> None:
    proc = trainpipe("--help")

    assert proc.returncode == 0
    for command in ("run", "resume", "status", "inspect", "demo"):
        assert command in proc.stdout


def test_error_text_with_closing_tag_is_not_markup(lesson_dir: Path, trainpipe) -> None:
    row = {"messages": [{"role": "[/INST]", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    (lesson_dir / "llama.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")

    proc = trainpipe("run", "configs/pipeline_config.yaml", "--sft-dataset", "llama.jsonl",
                     "--preference-dataset", "preference.jsonl")

    assert_clean_usage_error(proc)
    assert "messages[0].role '[/INST]' is not one of" in proc.stderr


def test_error_text_with_brackets_is_printed_verbatim(lesson_dir: Path, trainpipe) -> None:
    proc = trainpipe(*LESSON_RUN, "--set", "validation.custom_checks=[no_such_check]")

    assert_clean_usage_error(proc)
    assert "--set validation.custom_checks=[no_such_check]: " in proc.stderr


# ------------------------------------------------------------------ resume


def test_resume_unknown_run_exits_2(trainpipe) -> None:
    proc = trainpipe("resume", "no-such-run")

    assert_clean_usage_error(proc)
    assert "no run with id 'no-such-run'" in proc.stderr


@pytest.mark.parametrize("run_id", ["../etc", "a/../../b", "/abs"])
def test_resume_invalid_run_id_exits_2(run_id: str, trainpipe) -> None:
    proc = trainpipe("resume", run_id)

    assert_clean_usage_error(proc)
    assert f"invalid run id '{run_id}'" in proc.stderr


def test_resume_succeeded_run_exits_2_and_changes_nothing(ledger: Ledger, tmp_path: Path) -> None:
    run_id = make_run(ledger, tmp_path)
    ledger.transition_run(run_id, "start", fsm("run", "start"), set_owner=True)
    ledger.transition_run(run_id, "succeed", fsm("run", "succeed"), clear_owner=True)
    before = ledger.transitions(run_id)

    proc = cli("resume", run_id)

    assert_clean_usage_error(proc)
    assert f"run {run_id} is succeeded; only interrupted or failed runs can be resumed" in proc.stderr
    assert "trainpipe run" in proc.stderr  # the hint
    assert ledger.get_run(run_id)["state"] == "succeeded"
    assert ledger.transitions(run_id) == before


def test_resume_pending_run_exits_2(ledger: Ledger, tmp_path: Path, trainpipe) -> None:
    run_id = make_run(ledger, tmp_path)

    proc = trainpipe("resume", run_id)

    assert_clean_usage_error(proc)
    assert f"run {run_id} is pending" in proc.stderr
    assert ledger.get_run(run_id)["state"] == "pending"


# ------------------------------------------------------------------ status and inspect


def test_status_json_on_empty_ledger() -> None:
    result = runner.invoke(app, ["status", "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    assert result.stdout.strip() == "[]"


def test_status_human_on_empty_ledger() -> None:
    result = runner.invoke(app, ["status"])

    assert result.exit_code == 0
    assert "No runs yet" in result.stdout


def test_status_uses_db_option_over_env(tmp_path: Path, ledger: Ledger) -> None:
    make_run(ledger, tmp_path)
    other = f"sqlite:///{tmp_path / 'other.db'}"

    assert json.loads(runner.invoke(app, ["status", "--json", "--db", other]).stdout) == []
    assert [r["run_id"] for r in json.loads(runner.invoke(app, ["status", "--json"]).stdout)] == \
        ["lesson-20250101-000000-abcd"]


def _abandoned_run(ledger: Ledger, tmp_path: Path) -> tuple[str, int]:
    """A run marked running, mid-SFT, whose owner process is dead."""
    run_id = make_run(ledger, tmp_path)
    ledger.transition_run(run_id, "start", fsm("run", "start"), set_owner=True)
    ledger.transition_stage(run_id, "sft", "start", fsm("stage", "start"))
    ledger.open_attempt(run_id, "sft")
    pid = dead_pid()
    ledger.update_run(run_id, owner_pid=pid)
    return run_id, pid


def test_status_marks_dead_owner_interrupted(ledger: Ledger, tmp_path: Path) -> None:
    run_id, pid = _abandoned_run(ledger, tmp_path)

    result = runner.invoke(app, ["status", "--json"])

    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert (row["run_id"], row["state"], row["owner"]) == (run_id, "interrupted", None)
    interrupts = [t for t in ledger.transitions(run_id) if t["trigger"] == "interrupt"]
    assert len(interrupts) == 1
    assert (interrupts[0]["stage"], interrupts[0]["from_state"], interrupts[0]["to_state"]) == \
        (None, "running", "interrupted")
    assert f"owner pid {pid}" in interrupts[0]["detail"]["reason"]
    run = ledger.get_run(run_id)
    assert (run["state"], run["owner_pid"]) == ("interrupted", None)
    assert ledger.stages(run_id)[0]["state"] == "failed"
    assert [a["outcome"] for a in ledger.attempts(run_id)] == ["interrupted"]

    # a second look does not interrupt it again
    runner.invoke(app, ["status", "--json"])
    assert sum(t["trigger"] == "interrupt" for t in ledger.transitions(run_id)) == 1


def test_status_leaves_a_live_owner_running(ledger: Ledger, tmp_path: Path) -> None:
    run_id = make_run(ledger, tmp_path)
    ledger.transition_run(run_id, "start", fsm("run", "start"), set_owner=True)  # owner: this test process

    [row] = json.loads(runner.invoke(app, ["status", "--json"]).stdout)

    assert row["state"] == "running"
    assert row["owner"] == f"pid {os.getpid()} on {ledger.get_run(run_id)['owner_host']}"
    assert not any(t["trigger"] == "interrupt" for t in ledger.transitions(run_id))


def test_inspect_json_of_abandoned_run(ledger: Ledger, tmp_path: Path) -> None:
    run_id, _ = _abandoned_run(ledger, tmp_path)
    attempt_id = ledger.attempts(run_id)[0]["id"]
    ledger.record_gate(run_id, "sft", attempt_id, "gate1", True,
                       [{"name": "loss_below_max", "passed": True, "value": 1.0, "threshold": 2.0}])

    result = runner.invoke(app, ["inspect", run_id, "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"run_id", "state", "stages", "transitions", "final_model_path"} <= set(report)
    assert report["run_id"] == run_id
    assert report["state"] == "interrupted"
    assert report["final_model_path"] is None
    assert [(s["name"], s["state"], s["attempts"]) for s in report["stages"]] == [
        ("sft", "failed", 1), ("merge", "pending", 0), ("dpo", "pending", 0)]
    assert all({"name", "state", "attempts", "gate"} <= set(s) for s in report["stages"])
    assert report["stages"][0]["gate"]["name"] == "gate1"
    assert report["stages"][0]["gate"]["passed"] is True
    assert report["stages"][0]["gate"]["checks"][0]["name"] == "loss_below_max"
    assert report["stages"][1]["gate"] is None
    triggers = [(t["stage"], t["trigger"]) for t in report["transitions"]]
    assert triggers == [(None, "create"), (None, "start"), ("sft", "start"), (None, "interrupt"), ("sft", "fail")]


def test_inspect_unknown_and_invalid_ids_exit_2(trainpipe) -> None:
    proc = trainpipe("inspect", "no-such-run")
    assert_clean_usage_error(proc)
    assert "no run with id 'no-such-run'" in proc.stderr

    proc = trainpipe("inspect", "../etc")
    assert_clean_usage_error(proc)
    assert "invalid run id '../etc'" in proc.stderr


def test_status_json_via_console_script(ledger: Ledger, tmp_path: Path) -> None:
    run_id, _ = _abandoned_run(ledger, tmp_path)

    proc = cli("status", "--json")

    assert proc.returncode == 0, proc.stderr
    assert [(r["run_id"], r["state"]) for r in json.loads(proc.stdout)] == [(run_id, "interrupted")]


# ------------------------------------------------------------------ the CLI stays light


_LIGHT_CHECK = (
    "import sys, runpy\n"
    "sys.argv = ['trainpipe', *{args!r}]\n"
    "try:\n"
    "    runpy.run_module('trainpipe.cli.app', run_name='__main__')\n"
    "except SystemExit as exc:\n"
    "    assert not exc.code, exc.code\n"
    "heavy = [m for m in {modules!r} if m in sys.modules]\n"
    "assert not heavy, heavy\n"
)


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["inspect", "RUN"], ["inspect", "RUN", "--json"]])
def test_status_and_inspect_stay_light(command: list[str], ledger: Ledger, tmp_path: Path) -> None:
    """benchmarks/cli_startup.py times them at 10,000 runs; what keeps them fast is what they do not
    import: no torch stack, and on a migrated SQLite ledger neither SQLAlchemy, Alembic nor `transitions`;
    nor pydantic, which Typer 0.29 pulls in to coerce options (pyproject keeps Typer below it)."""
    run_id, _ = _abandoned_run(ledger, tmp_path)
    ledger.transition_run(run_id, "interrupt", fsm("run", "interrupt"), clear_owner=True)  # nothing left to mark
    args = [run_id if a == "RUN" else a for a in command]
    modules = ("torch", "transformers", "trl", "peft", "datasets", "sqlalchemy", "transitions", "alembic",
               "pydantic")
    proc = subprocess.run([sys.executable, "-c", _LIGHT_CHECK.format(args=args, modules=modules)],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=120)

    assert proc.returncode == 0, proc.stderr
    assert run_id in proc.stdout


def test_status_finding_a_dead_owner_writes_through_the_full_ledger(ledger: Ledger, tmp_path: Path) -> None:
    """The light read path must still mark an abandoned run: that write loads SQLAlchemy, on demand."""
    run_id, _ = _abandoned_run(ledger, tmp_path)
    modules = ("torch", "transformers")
    proc = subprocess.run([sys.executable, "-c", _LIGHT_CHECK.format(args=["status"], modules=modules)],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=120)

    assert proc.returncode == 0, proc.stderr
    assert ledger.get_run(run_id)["state"] == "interrupted"
    assert [a["outcome"] for a in ledger.attempts(run_id)] == ["interrupted"]


def test_shell_completion_completes_commands() -> None:
    env = {**os.environ, "_TRAINPIPE_COMPLETE": "complete_bash", "COMP_WORDS": "trainpipe ins", "COMP_CWORD": "1"}
    # Completion is keyed on the program name, so it goes through the installed console script.
    console_script = str(Path(sys.executable).parent / "trainpipe")
    proc = subprocess.run([console_script], capture_output=True, text=True, env=env, timeout=60)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["inspect"]
    script = subprocess.run([console_script, "--show-completion", "bash"],
                            capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "_TRAINPIPE_COMPLETE=complete_bash" in script.stdout
