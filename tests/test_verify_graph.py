"""`trainpipe verify` re-hashes a real run's artifacts; `inspect --graph` draws the transition table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QUICKSTART, fast_overrides
from helpers import cli

from trainpipe.engine.machine import RUN_TRANSITIONS, STAGE_TRANSITIONS
from trainpipe.store.ledger import Ledger


def test_verify_reports_changed_and_vanished_artifacts(tmp_path: Path, db_url: str) -> None:
    sets = fast_overrides(tmp_path / "out") + ["sft.max_steps=4", "stages.merge.enabled=false",
                                               "stages.dpo.enabled=false"]
    cli("run", QUICKSTART, "--db", db_url, *[a for s in sets for a in ("--set", s)], check=True)
    ledger = Ledger(db_url)
    (run,) = ledger.list_runs()
    artifacts = ledger.artifacts(run["run_id"])
    assert len(artifacts) >= 2
    # The stage process hashed its output beside its gate, and those are the hashes recorded.
    run_dir = Path(ledger.get_run(run["run_id"])["run_dir"])
    result = json.loads((run_dir / ".work" / "sft" / "result-1.json").read_text())
    output = Path(result["output_path"])
    assert sorted((str(output / rel), size, digest) for rel, size, digest, _ in result["output_files"]) == sorted(
        (a["path"], a["size_bytes"], a["sha256"]) for a in artifacts)

    clean = cli("verify", run["run_id"], "--db", db_url)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert f"all {len(artifacts)} artifacts" in clean.stdout

    changed, vanished = Path(artifacts[0]["path"]), Path(artifacts[1]["path"])
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF
    changed.write_bytes(bytes(data))
    vanished.unlink()
    proc = cli("verify", run["run_id"], "--db", db_url, "--json")

    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert (report["ok"], report["changed"], report["missing"]) == (False, 1, 1)
    status = {a["path"]: a["status"] for a in report["artifacts"]}
    assert status[str(changed)] == "changed" and status[str(vanished)] == "missing"
    assert {s for p, s in status.items() if p not in (str(changed), str(vanished))} <= {"ok"}
    assert "changed" in cli("verify", run["run_id"], "--db", db_url).stdout


def test_verify_unknown_run_exits_2(db_url: str) -> None:
    proc = cli("verify", "no-such-run", "--db", db_url)
    assert proc.returncode == 2 and "no run with id 'no-such-run'" in proc.stderr


def test_graph_is_drawn_from_the_transition_tables() -> None:
    proc = cli("inspect", "--graph", "--json", check=True)
    diagrams = json.loads(proc.stdout)
    for kind, table in (("run", RUN_TRANSITIONS), ("stage", STAGE_TRANSITIONS)):
        want = {(source, row["dest"], row["trigger"]) for row in table
                for source in (row["source"] if isinstance(row["source"], list) else [row["source"]])}
        lines = diagrams[kind].splitlines()
        assert lines[0] == "stateDiagram-v2" and lines[1] == "    [*] --> pending"
        drawn = {(left.strip(), right.split(":")[0].strip(), right.split(":")[1].strip())
                 for left, right in (line.split("-->") for line in lines[2:] if ":" in line)}
        assert drawn == want


@pytest.mark.extended  # CI's budget: `make matrix` runs it
def test_inspect_draws_curves_as_sparklines_and_into_a_png(tmp_path: Path, db_url: str) -> None:
    sets = fast_overrides(tmp_path / "out")
    cli("run", QUICKSTART, "--db", db_url, *[a for s in sets for a in ("--set", s)], check=True)
    (run,) = Ledger(db_url).list_runs()

    text = cli("inspect", run["run_id"], "--db", db_url, check=True).stdout
    loss_lines = [line for line in text.splitlines() if line.strip().startswith("loss ")]
    assert len(loss_lines) == 2, text  # SFT and DPO
    assert any(line.strip().startswith("rewards/margins") for line in text.splitlines())
    assert all(set(line.split()[1]) <= set("▁▂▃▄▅▆▇█") for line in loss_lines)
    report = json.loads(cli("inspect", run["run_id"], "--db", db_url, "--json", check=True).stdout)
    sft_curve = next(s for s in report["stages"] if s["name"] == "sft")["curves"]["loss"]
    assert [step for step, _ in sft_curve] == list(range(1, 13))  # logging_steps 1, 12 steps

    png = tmp_path / "curves.png"
    proc = cli("inspect", run["run_id"], "--db", db_url, "--plot", str(png), check=True)
    assert f"plot written to {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    bad = cli("inspect", run["run_id"], "--db", db_url, "--plot", str(tmp_path / "curves.txt"))
    assert bad.returncode == 2 and "give a .png, .svg or .pdf" in bad.stderr and "Traceback" not in bad.stderr


def test_gpu_memory_fraction_is_recorded_per_attempt(tmp_path: Path, db_url: str) -> None:
    import torch

    sets = fast_overrides(tmp_path / "out") + ["sft.max_steps=2", "stages.merge.enabled=false",
                                               "stages.dpo.enabled=false", "gpu_memory_fraction=0.5"]
    cli("run", QUICKSTART, "--db", db_url, *[a for s in sets for a in ("--set", s)], check=True)
    (run,) = Ledger(db_url).list_runs()
    (attempt,) = Ledger(db_url).attempts(run["run_id"])
    # Applied (and so recorded) only where there is CUDA memory to cap.
    assert attempt["metrics"]["gpu_memory_fraction"] == (0.5 if torch.cuda.is_available() else None)


def test_output_hashes_from_the_stage_are_used_only_for_files_unchanged_since(tmp_path: Path) -> None:
    """The orchestrator records the hashes the stage process computed beside its gate, unless a file
    was added, changed or removed after they were computed: then it hashes the output itself."""
    import os

    from trainpipe.checkpoints import sha256_file
    from trainpipe.engine.stage_attempt import _output_hashes

    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.safetensors", "b.json"):
        (out / name).write_bytes(os.urandom(4096))

    def reported(digests: dict[str, str]) -> dict:
        return {"output_path": str(out), "output_files": [
            [name, (out / name).stat().st_size, digests[name], (out / name).stat().st_mtime_ns] for name in digests]}

    # Unchanged files: the reported hashes are taken as they are, without reading the files (a wrong
    # digest shows that they were not recomputed).
    planted = {"a.safetensors": "0" * 64, "b.json": sha256_file(out / "b.json")}
    assert _output_hashes(reported(planted)) == [("a.safetensors", 4096, "0" * 64), ("b.json", 4096, planted["b.json"])]

    # A file rewritten after hashing (same size, new mtime): everything is hashed here.
    stale = reported(planted)
    (out / "a.safetensors").write_bytes(os.urandom(4096))
    os.utime(out / "a.safetensors", ns=(stale["output_files"][0][3] + 10**9,) * 2)
    assert dict((rel, d) for rel, _, d in _output_hashes(stale))["a.safetensors"] == sha256_file(out / "a.safetensors")

    # A file added after hashing, and a report that is missing: hashed here too.
    fresh = reported({name: sha256_file(out / name) for name in ("a.safetensors", "b.json")})
    (out / "c.txt").write_text("late")
    assert [rel for rel, _, _ in _output_hashes(fresh)] == ["a.safetensors", "b.json", "c.txt"]
    assert [rel for rel, _, _ in _output_hashes({"output_path": str(out)})] == ["a.safetensors", "b.json", "c.txt"]
