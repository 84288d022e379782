"""`trainpipe submit --slurm` without a cluster: the batch script it would submit, bad input refused
before anything is written, and an SQLite ledger on a network file system refused (the real Slurm
runs are in tests/test_slurm.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import QUICKSTART
from helpers import cli

from trainpipe.engine import submit
from trainpipe.errors import PreflightError


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_dry_run_prints_the_batch_script_and_writes_nothing(tmp_path, db_url):
    out = tmp_path / "out"
    proc = cli("submit", str(QUICKSTART), "--slurm", "--dry-run", "--nodes", "2", "--gpus-per-node", "8",
               "--time", "04:00:00", "--partition", "gpu", "--account", "proj", "--max-requeues", "3",
               "--grace", "120", "--set", f"output_dir={out}", "--set", "sft.learning_rate=1e-4")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR2@120", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --time=04:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj"):
        assert line + "\n" in script, line
    [exec_line] = [line for line in script.splitlines() if line.startswith("exec ")]
    assert f"run {QUICKSTART} --run-id quickstart-" in exec_line
    assert "--set sft.learning_rate=1e-4" in exec_line and "--max-requeues 3" in exec_line
    assert f"--db {db_url}" in exec_line
    # The script is valid bash as printed (one logical line per command, nothing wrapped).
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert _tree(out) == [] and not Path(db_url.removeprefix("sqlite:///")).exists()


def test_bad_input_and_a_missing_scheduler_are_refused_before_anything_is_written(tmp_path, db_url):
    out = tmp_path / "out"
    bad = cli("submit", str(QUICKSTART), "--slurm", "--set", f"output_dir={out}", "--set", "sft.lora_r=0")
    assert bad.returncode == 2 and "sft.lora_r" in bad.stderr and "Traceback" not in bad.stderr
    no_flag = cli("submit", str(QUICKSTART), "--set", f"output_dir={out}")
    assert no_flag.returncode == 2 and "give --slurm" in no_flag.stderr
    assert _tree(out) == [] and not Path(db_url.removeprefix("sqlite:///")).exists()


def test_sqlite_ledger_on_a_network_file_system_is_refused_unless_forced(small_fs, tmp_path, monkeypatch):
    """The file system is looked up in the real mount table. No NFS server can run here, so a tmpfs
    stands in for one: its type is added to the network file systems for this test alone."""
    mount = small_fs("16m")
    assert submit.filesystem_type(mount / "ledger.db") == "tmpfs"
    assert submit.sqlite_on_network_fs(f"sqlite:///{tmp_path / 'ledger.db'}") is None
    monkeypatch.setattr(submit, "NETWORK_FILESYSTEMS", (*submit.NETWORK_FILESYSTEMS, "tmpfs"))
    request = submit.SlurmRequest()
    with pytest.raises(PreflightError, match="SQLite file on tmpfs") as refused:
        submit.submit(str(QUICKSTART), request=request, overrides=[f"output_dir={tmp_path / 'out'}"],
                      db_url=f"sqlite:///{mount / 'ledger.db'}", dry_run=True)
    assert "postgresql" in refused.value.hint
    notes: list[str] = []
    done = submit.submit(str(QUICKSTART), request=request, overrides=[f"output_dir={tmp_path / 'out'}"],
                         db_url=f"sqlite:///{mount / 'ledger.db'}", dry_run=True, force=True, note=notes.append)
    assert done.job_id is None and "--run-id" in done.script
    assert notes and "SQLite file on tmpfs" in notes[0]
