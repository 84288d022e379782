"""A full disk is an environment error, not a bug: real small tmpfs mounts, real writes that fail with
ENOSPC, the real CLI. The run stops `interrupted` (exit 75) with one message naming the directory and
its free space, writes no crash log, and `trainpipe resume` finishes it once there is room.

Mounting needs root (or CAP_SYS_ADMIN): where it is not permitted these tests skip, saying why;
under CI=true they fail instead."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import QUICKSTART
from helpers import cli, wait_for
from trainpipe.errors import EXIT_ENVIRONMENT
from trainpipe.failures import BUG, ENVIRONMENT, classify
from trainpipe.store.ledger import Ledger

# SFT alone, a checkpoint every step: a 2 MB filesystem fills with the 5th or so checkpoint (~310 kB each).
# The gate's learning checks are warnings, as in conftest.fast_overrides: 12 steps teach little.
SMALL_RUN = ["sft.max_steps=12", "checkpoint_every_n_steps=1", "stages.merge.enabled=false",
             "stages.dpo.enabled=false", "validation.max_new_tokens=32",
             "validation.checks.output_format_valid.severity=warn", "validation.checks.loss_went_down.severity=warn"]


def _sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _fill(directory: Path) -> Path:
    """Write until the filesystem refuses (ENOSPC), as another program filling the disk would."""
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def _crash_logs(home: Path) -> list[Path]:
    return list((home / "logs").glob("trainpipe-crash-*")) if (home / "logs").is_dir() else []


def _run_row(db_url: str, run_id: str) -> dict:
    ledger = Ledger(db_url)
    try:
        return {**ledger.get_run(run_id), "stages": {s["name"]: s["state"] for s in ledger.stages(run_id)}}
    finally:
        ledger.close()


def _run_id(stdout: str) -> str:
    return stdout.split("Run ", 1)[1].split()[0]


def test_torch_and_safetensors_save_errors_on_a_full_disk_are_environment_errors(small_fs):
    """torch.save's `basic_ios::clear` / PytorchStreamWriter error carries no errno: the disk is asked.
    The same error on a disk with room stays a bug; safetensors' error is matched by its message."""
    import torch
    from safetensors.torch import save_file

    disk = small_fs("1m")
    _fill(disk)
    tensor = torch.zeros(256, 1024)  # 1 MB: more than is left
    with pytest.raises(RuntimeError) as torch_error:
        torch.save({"t": tensor}, disk / "optimizer.pt")
    failure = classify(torch_error.value, written_dirs=[disk])
    assert (failure.kind, failure.cause, failure.where) == (ENVIRONMENT, "disk", str(disk)), torch_error.value
    assert classify(torch_error.value).kind == BUG  # no directory to ask: not claimed to be the disk
    with pytest.raises(Exception) as safetensors_error:
        save_file({"t": tensor}, str(disk / "adapter_model.safetensors"))
    assert classify(safetensors_error.value, written_dirs=[disk]).kind == ENVIRONMENT, safetensors_error.value

    small_fs("8m")  # room again
    assert classify(torch_error.value, written_dirs=[disk]).kind == BUG  # room again: not the disk


def test_preflight_refuses_a_too_small_output_filesystem_and_force_overrides(small_fs, tmp_path, db_url):
    disk = small_fs("2m")
    proc = cli("run", str(QUICKSTART), *_sets(f"output_dir={disk / 'out'}", *SMALL_RUN), "--db", db_url)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stdout + proc.stderr
    assert "will write about" in message and "12 checkpoints" in message and "--force" in message, message
    assert "MB free" in message and str(disk) in message, message
    assert not (disk / "out").exists()
    ledger = Ledger(db_url)
    try:
        assert ledger.list_runs(limit=None) == []  # nothing recorded
    finally:
        ledger.close()


def test_a_sweep_is_checked_for_all_its_trials_and_force_starts_it(small_fs, tmp_path, db_url):
    """One trial fits, three do not: each trial sweeps SFT's learning rate, so each writes its own SFT."""
    import signal
    import sys

    import yaml

    from trainpipe.config import load_config
    from trainpipe.engine import preflight
    from trainpipe.stages.footprint import estimate

    per_run = estimate(load_config(QUICKSTART, overrides=SMALL_RUN)).total
    disk = small_fs(str(int(per_run * 1.8)))  # bytes
    overrides = [f"output_dir={disk / 'out'}", *SMALL_RUN]
    assert preflight.disk_space_problems(load_config(QUICKSTART, overrides=overrides)) == ([], None)  # a run fits
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(QUICKSTART), "set": overrides, "strategy": "grid",
                                     "space": {"sft.learning_rate": [1.0e-3, 2.0e-3, 3.0e-3]},
                                     "objective": {"metric": "sft.final_loss", "direction": "minimize"}}))

    proc = cli("sweep", str(sweep), "--db", db_url)
    message = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, message
    assert f"output_dir '{disk / 'out'}': its filesystem ({disk}) has" in message, message
    assert "this sweep of 3 trials will write about" in message, message
    assert "sft ~" in message and "(12 checkpoints" in message and "in each of 3 trials = ~" in message, message
    assert "sweep fewer trials" in message and "--force" in message and "Traceback" not in message, message
    ledger = Ledger(db_url)
    try:
        assert ledger.list_sweeps() == [] and ledger.list_runs(limit=None) == []  # nothing recorded
        assert not (disk / "out").exists()

        # --force: the sweep is created and its first trial starts; stopped there (Ctrl-C), not trained out.
        # On a disk too small for even one trial: the trial's own preflight would refuse it, unless
        # it inherits the sweep's --force.
        small_fs(str(int(per_run * 0.5)))
        assert preflight.disk_space_problems(load_config(QUICKSTART, overrides=overrides))[0]  # a run does not fit
        started = subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "sweep", str(sweep), "--force",
                                    "--db", db_url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: (ledger.list_sweeps() and ledger.list_runs(limit=None)) or started.poll() is not None,
                     timeout=120, what="the forced sweep to record itself and its first trial")
        finally:
            started.send_signal(signal.SIGINT)
            output, _ = started.communicate(timeout=120)
        sweeps = ledger.list_sweeps()
        assert len(sweeps) == 1, output
        assert ledger.get_sweep(sweeps[0]["sweep_id"])["spec"]["force"] is True
        (trial_run,) = ledger.list_runs(limit=None)
        assert trial_run["run_id"] == ledger.sweep_trials(sweeps[0]["sweep_id"])[0]["run_id"], output
        assert "will write about" not in output, output
    finally:
        ledger.close()


def test_full_disk_in_a_stage_and_in_the_exports_stops_the_run_resumably(small_fs, tmp_path, db_url, isolated_env):
    # 1. A stage's checkpoint save fills the disk.
    disk = small_fs("2m")
    out = disk / "out"
    proc = cli("run", str(QUICKSTART), "--force", *_sets(f"output_dir={out}", *SMALL_RUN), "--db", db_url)
    text = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_ENVIRONMENT, text
    run_id = _run_id(proc.stdout)
    row = _run_row(db_url, run_id)
    assert row["state"] == "interrupted" and row["error_kind"] == ENVIRONMENT, row
    assert row["stages"]["sft"] == "failed"
    assert "no space left on device" in row["error"] and str(out / run_id) in row["error"], row["error"]
    assert "free of" in row["error"] and "this stage writes sft ~" in row["error"], row["error"]
    assert f"trainpipe resume {run_id}" in text and "bug" not in text.lower() and "Traceback" not in text, text
    assert "not retried: the disk stays full" in text, text
    assert _crash_logs(isolated_env) == []
    assert not row["error_traceback"]

    # Free space: the same filesystem, bigger. The resume continues from a verified checkpoint.
    small_fs("64m")
    proc = cli("resume", run_id, "--db", db_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming from" in proc.stdout
    assert _run_row(db_url, run_id)["state"] == "succeeded"
    result = json.loads((out / run_id / "pipeline_result.json").read_text())
    assert result["success"] is True and result["stage_results"]["sft"]["success"] is True

    # 2. The orchestrator's own write: a second run reuses SFT from the cache (hard links, no data
    # written), so the first thing to need space is its result files.
    filler = _fill(disk)
    proc = cli("run", str(QUICKSTART), "--force", *_sets(f"output_dir={out}", *SMALL_RUN), "--db", db_url)
    text = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_ENVIRONMENT, text
    second = _run_id(proc.stdout)
    row = _run_row(db_url, second)
    assert row["state"] == "interrupted" and row["error_kind"] == ENVIRONMENT, row
    assert row["stages"]["sft"] == "cached"
    assert "pipeline_result.json" in row["error"] and "no space left on device" in row["error"], row["error"]
    assert str(out / second) in row["error"] and "free of" in row["error"], row["error"]
    assert f"trainpipe resume {second}" in text and "bug" not in text.lower() and "Traceback" not in text, text
    assert not (out / second / "pipeline_result.json").exists()
    assert _crash_logs(isolated_env) == []

    filler.unlink()
    proc = cli("resume", second, "--db", db_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _run_row(db_url, second)["state"] == "succeeded"
    result = json.loads((out / second / "pipeline_result.json").read_text())
    assert result["success"] is True and result["state"] == "succeeded" and result["run_id"] == second
