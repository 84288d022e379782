"""Lineage: recorded when a run is created, shown by `inspect` and the exports; `resume` compares the
environment with it and refuses a breaking change unless --force. Real runs, a real ledger edited in
SQLite to stand for another environment."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICKSTART, TASK_API, fast_overrides
from helpers import cli

from trainpipe.checkpoints import sha256_file
from trainpipe.config import config_from_snapshot
from trainpipe.engine import preflight
from trainpipe.engine.identity import world_size
from trainpipe.engine.lineage import LIBRARIES
from trainpipe.stages.tiny_model import ASSET_DIR, CHECKSUMS
from trainpipe.store.ledger import Ledger

SFT_ONLY = ["sft.max_steps=2", "stages.merge.enabled=false", "stages.dpo.enabled=false"]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _file(db_url: str) -> Path:
    return Path(db_url.removeprefix("sqlite:///"))


def _ledger_bytes(db_url: str) -> bytes:
    file = _file(db_url)
    return b"".join(p.read_bytes() for p in (file, Path(f"{file}-wal")) if p.is_file())


def _edit_lineage(db_url: str, run_id: str, edit) -> None:
    """A real edit of the ledger file: the recorded lineage, as another environment would have written it."""
    conn = sqlite3.connect(_file(db_url))
    try:
        (raw,) = conn.execute("SELECT lineage FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        lineage = json.loads(raw)
        edit(lineage)
        conn.execute("UPDATE runs SET lineage = ? WHERE run_id = ?", (json.dumps(lineage), run_id))
        conn.commit()
    finally:
        conn.close()


def _ledger_rows(db_url: str, run_id: str) -> tuple:
    conn = sqlite3.connect(_file(db_url))
    try:
        return tuple(conn.execute(f"SELECT * FROM {table} WHERE run_id = ? ORDER BY 1", (run_id,)).fetchall()
                     for table in ("runs", "stages", "transitions", "stage_attempts"))
    finally:
        conn.close()


def _crashed_run(tmp_path: Path, db_url: str) -> str:
    """A run that failed before any stage started (an injected orchestrator crash): resumable, cheap."""
    env = os.environ.copy()
    env["TRAINPIPE_FAULT"] = json.dumps({"action": "crash_orchestrator", "at": "run:start",
                                         "once_file": str(tmp_path / "fired")})
    proc = cli("run", str(QUICKSTART), "--db", db_url, *_sets(fast_overrides(tmp_path / "out") + SFT_ONLY), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (run,) = Ledger(db_url).list_runs()
    assert run["state"] == "failed"
    return run["run_id"]


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_lineage_is_recorded_and_shown_by_inspect_and_the_exports(tmp_path: Path, db_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    token = "hf_fakeLineageSecret0123456789"
    monkeypatch.setenv("HF_TOKEN", token)  # in the environment of the run: must end up nowhere
    cli("run", str(QUICKSTART), "--db", db_url, *_sets(fast_overrides(tmp_path / "out") + SFT_ONLY), check=True)
    ledger = Ledger(db_url)
    (row,) = ledger.list_runs()
    run_id = row["run_id"]
    run = ledger.get_run(run_id)
    lineage = run["lineage"]

    assert [s["name"] for s in ledger.stages(run_id)] == ["sft", "merge", "dpo"]  # no upload stage unless enabled
    assert lineage["config_sha256"] == hashlib.sha256(
        json.dumps(run["config_snapshot"], sort_keys=True).encode()).hexdigest()
    assert lineage["seed"] == 42 == config_from_snapshot(run["config_snapshot"]).seed
    assert lineage["datasets"]["sft"] == {"source": str(TASK_API / "sft.jsonl"),
                                          "sha256": sha256_file(TASK_API / "sft.jsonl"),
                                          "format": "auto", "columns": {}, "roles": {}}
    assert lineage["datasets"]["preference"]["sha256"] == sha256_file(TASK_API / "preference.jsonl")
    assert lineage["base_model"] == {"name": "builtin:tiny-qwen2", "builtin": "builtin:tiny-qwen2",
                                     "sha256sums": sha256_file(ASSET_DIR / CHECKSUMS)}
    assert lineage["libraries"] == {"python": platform.python_version(), **{n: _version(n) for n in LIBRARIES}}
    assert lineage["libraries"]["torch"] == torch.__version__
    assert lineage["device"]["type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert lineage["cpu_kernel"] == (os.environ.get("ATEN_CPU_CAPABILITY") or None)
    assert lineage["world_size"] == {"sft": 1}

    artifacts = {a["path"]: (a["stage"], a["size_bytes"], a["sha256"]) for a in ledger.artifacts(run_id)}
    assert len(artifacts) >= 2
    report = json.loads(cli("inspect", run_id, "--db", db_url, "--json", check=True).stdout)
    shown = report["lineage"]
    assert {k: v for k, v in shown.items() if k not in ("artifacts", "recorded")} == lineage
    assert {a["path"]: (a["stage"], a["size_bytes"], a["sha256"]) for a in shown["artifacts"]} == artifacts
    assert all(Path(p).stat().st_size == size for p, (_, size, _) in artifacts.items())

    text = cli("inspect", run_id, "--db", db_url, check=True).stdout
    block = text[text.index("lineage"):text.index("stage sft")]
    assert f"config sha256 {lineage['config_sha256'][:12]}  seed 42" in block
    assert f"torch {torch.__version__}" in block and "world size: sft 1" in block
    assert f"dataset sft: {TASK_API / 'sft.jsonl'} sha256 {lineage['datasets']['sft']['sha256'][:12]}" in block
    assert f"artifacts: sft {len(artifacts)} files" in block

    exported = json.loads((Path(run["run_dir"]) / "pipeline_result.json").read_text())
    assert exported["lineage"] == shown

    assert token.encode() not in _ledger_bytes(db_url)
    for path in Path(tmp_path / "out").rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def test_resume_refuses_a_breaking_environment_change_unless_forced(tmp_path: Path, db_url: str) -> None:
    run_id = _crashed_run(tmp_path, db_url)
    torch_now, accelerate_now = _version("torch"), _version("accelerate")
    torch_then = f"{int(torch_now.split('.')[0]) + 1}.0.0"
    major = accelerate_now.split(".")[0]
    accelerate_then = f"{major}.0.0" if accelerate_now != f"{major}.0.0" else f"{major}.999.0"

    def other_environment(lineage: dict) -> None:
        lineage["libraries"]["torch"] = torch_then
        lineage["libraries"]["accelerate"] = accelerate_then
        lineage["world_size"]["sft"] = 2

    _edit_lineage(db_url, run_id, other_environment)
    before = _ledger_rows(db_url, run_id)

    refused = cli("resume", run_id, "--db", db_url)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    err = refused.stderr
    assert "Traceback" not in err
    assert f"torch: {torch_then} -> {torch_now} (major version)" in err
    assert "world size (sft): 2 -> 1" in err
    assert f"accelerate: {accelerate_then} -> {accelerate_now} (minor/patch version)" in err
    assert err.index("world size (sft)") < err.index("would not stop a resume") < err.index("accelerate:")
    assert f"trainpipe resume {run_id} --force" in err
    assert _ledger_rows(db_url, run_id) == before, "a refused resume writes nothing"

    forced = cli("resume", run_id, "--db", db_url, "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    out = " ".join(forced.stdout.split())
    assert f"resumed with --force despite: torch: {torch_then} -> {torch_now}" in out
    assert f"accelerate: {accelerate_then} -> {accelerate_now}" in out
    ledger = Ledger(db_url)
    assert ledger.get_run(run_id)["state"] == "succeeded"
    (resume,) = [t for t in ledger.transitions(run_id) if t["trigger"] == "resume"]
    env = resume["detail"]["environment"]
    assert env["checked"] is True and env["forced"] is True
    assert {(d["key"], d["recorded"], d["now"], d["breaking"]) for d in env["differences"]} == {
        ("torch", torch_then, torch_now, True), ("world size (sft)", 2, 1, True),
        ("accelerate", accelerate_then, accelerate_now, False)}
    assert env["now"]["libraries"]["torch"] == torch_now
    # The lineage stays what the run was created with; the transition holds what was accepted.
    assert ledger.get_run(run_id)["lineage"]["libraries"]["torch"] == torch_then


def test_resume_notes_a_minor_change_and_a_run_without_lineage(tmp_path: Path, db_url: str) -> None:
    run_id = _crashed_run(tmp_path, db_url)
    trl_now = _version("trl")
    trl_then = trl_now + ".post1"  # same major: recorded and shown, never refused

    _edit_lineage(db_url, run_id, lambda lineage: lineage["libraries"].update(trl=trl_then))
    ledger = Ledger(db_url)
    run = ledger.get_run(run_id)
    config = config_from_snapshot(run["config_snapshot"])
    detail, notes = preflight.check_environment(ledger, run, config, force=False)
    assert detail["forced"] is False and [d["key"] for d in detail["differences"]] == ["trl"]
    assert notes == [f"environment changed since the run last ran (not breaking): trl: {trl_then} -> {trl_now} "
                     "(minor/patch version)"]

    # A run created before lineage was recorded: resumed without a check, and said so.
    _edit_lineage_null(db_url, run_id)
    proc = cli("resume", run_id, "--db", db_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "environment not checked: this run was created before trainpipe recorded lineage" in \
        " ".join(proc.stdout.split())
    (resume,) = [t for t in Ledger(db_url).transitions(run_id) if t["trigger"] == "resume"]
    assert resume["detail"]["environment"]["checked"] is False
    report = json.loads(cli("inspect", run_id, "--db", db_url, "--json", check=True).stdout)
    assert report["lineage"]["recorded"] is False and report["lineage"]["artifacts"]


def _edit_lineage_null(db_url: str, run_id: str) -> None:
    conn = sqlite3.connect(_file(db_url))
    try:
        conn.execute("UPDATE runs SET lineage = NULL WHERE run_id = ?", (run_id,))
        conn.commit()
    finally:
        conn.close()


def test_world_size_reads_the_launcher_when_there_is_one() -> None:
    assert world_size({}) == 1
    assert world_size({"launcher": None}) == 1
    assert world_size({"launcher": {"type": "torchrun", "nproc_per_node": 2}}) == 2
    assert world_size({"launcher": {"type": "torchrun", "nproc_per_node": 2, "nnodes": 3,
                                    "rdzv_endpoint": "h:29500"}}) == 6
    assert world_size({"launcher": {"type": "torchrun", "nproc_per_node": "auto", "nnodes": 2}}) == \
        2 * len(os.sched_getaffinity(0))  # no GPU here: the CPUs this process may use


def test_recording_lineage_imports_no_torch() -> None:
    """The orchestrator records it before any stage runs; a fully cached run never loads torch."""
    import subprocess
    import sys

    code = ("import sys; from trainpipe.config import load_config; from trainpipe.engine import lineage; "
            f"c = load_config({str(QUICKSTART)!r}); record = lineage.build(c, c.model_dump(mode='json')); "
            "assert record['libraries']['torch']; print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.extended  # CI's budget: `make matrix` runs it
def test_auto_world_size_follows_the_cpus_and_a_resume_on_more_is_refused_unless_forced(
        tmp_path: Path, db_url: str) -> None:
    """`nproc_per_node: auto` resolves to the CPUs the process may use: created on one CPU (taskset's
    affinity, which auto reads), the run records world size 1; resumed with two CPUs it would train on
    2 ranks, and the resume is refused, naming it, until --force, which then trains on 2 ranks."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs to change the world size between the run and its resume")
    auto = ["sft.launcher.type=torchrun", "sft.launcher.nproc_per_node=auto"]
    env = {**os.environ, "TRAINPIPE_FAULT": json.dumps({"action": "crash_orchestrator", "at": "run:start",
                                                        "once_file": str(tmp_path / "fired")})}
    args = ["run", str(QUICKSTART), "--db", db_url, *_sets(fast_overrides(tmp_path / "out") + SFT_ONLY + auto)]
    created = subprocess.run([sys.executable, "-m", "trainpipe.cli.app", *args], capture_output=True, text=True,
                             env=env, timeout=600, preexec_fn=lambda: os.sched_setaffinity(0, {cpus[0]}))
    assert created.returncode == 1, created.stdout + created.stderr
    (run,) = Ledger(db_url).list_runs()
    run_id = run["run_id"]
    assert Ledger(db_url).get_run(run_id)["lineage"]["world_size"] == {"sft": 1}
    before = _ledger_rows(db_url, run_id)

    refused = cli("resume", run_id, "--db", db_url)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"world size (sft): 1 -> {len(cpus)}" in refused.stderr and "Traceback" not in refused.stderr
    assert _ledger_rows(db_url, run_id) == before, "a refused resume writes nothing"

    forced = cli("resume", run_id, "--db", db_url, "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    ledger = Ledger(db_url)
    assert ledger.get_run(run_id)["state"] == "succeeded"
    (attempt,) = [a for a in ledger.attempts(run_id) if a["stage"] == "sft"]
    assert attempt["worker"] == "torchrun" and attempt["metrics"]["world_size"] == len(cpus)
