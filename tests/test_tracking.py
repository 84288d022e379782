"""Experiment trackers: `report_to` reaches the trainers (TensorBoard, offline, for real), and a
tracker that is not installed is refused before anything is recorded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import QUICKSTART, fast_overrides
from helpers import cli

from trainpipe.store.ledger import Ledger


@pytest.mark.skipif(not (importlib.util.find_spec("tensorboardX") or importlib.util.find_spec("tensorboard")),
                    reason="needs tensorboardX or tensorboard (the dev extras install tensorboardX)")
def test_tensorboard_event_files_appear_per_stage(tmp_path: Path, db_url: str) -> None:
    proc = cli("run", QUICKSTART, "--db", db_url, *[a for s in fast_overrides(tmp_path / "out") + [
        "sft.max_steps=4", "stages.merge.enabled=false", "stages.dpo.enabled=false", "sft.report_to=tensorboard"]
        for a in ("--set", s)], check=True)

    (run,) = Ledger(db_url).list_runs()
    assert run["state"] == "succeeded", proc.stdout
    events = list((Path(Ledger(db_url).get_run(run["run_id"])["run_dir"]) / "tensorboard" / "sft").rglob(
        "events.out.tfevents.*"))
    assert events, "no TensorBoard event file under <run dir>/tensorboard/sft"
    # TFRecord frames of serialised Event protos: the scalar tags are stored as plain bytes.
    data = b"".join(e.read_bytes() for e in events)
    assert b"train/loss" in data and b"train/learning_rate" in data


def test_tracker_that_is_not_installed_is_refused_before_the_run(tmp_path: Path, db_url: str) -> None:
    if importlib.util.find_spec("mlflow"):
        pytest.skip("mlflow is installed here")
    proc = cli("run", QUICKSTART, "--db", db_url, "--set", f"output_dir={tmp_path / 'out'}",
               "--set", "dpo.report_to=mlflow")

    assert proc.returncode == 2
    assert "dpo.report_to: 'mlflow' needs the mlflow package" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert Ledger(db_url).count_runs() == 0


def test_unknown_tracker_names_the_key(tmp_path: Path, db_url: str) -> None:
    proc = cli("run", QUICKSTART, "--db", db_url, "--set", "sft.report_to=comet")

    assert proc.returncode == 2
    assert "sft.report_to" in proc.stderr and "tensorboard" in proc.stderr
    assert "Traceback" not in proc.stderr
