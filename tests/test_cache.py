"""The stage cache for real: trained runs, re-runs that reuse them, and artifacts altered or deleted
on disk. Training is counted from the ledger: a stage trained in a run has attempt rows there; a
reused one has none and is `cached`, linked to the run it came from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICKSTART, fast_overrides

import trainpipe
from trainpipe.config import load_config
from trainpipe.engine.fingerprint import stage_fingerprint
from trainpipe.store.ledger import Ledger


def _trained(ledger: Ledger, run_id: str) -> list[str]:
    """Stages that trained (ran at least one attempt) in this run."""
    return sorted({a["stage"] for a in ledger.attempts(run_id)}, key=["sft", "merge", "dpo"].index)


def _states(ledger: Ledger, run_id: str) -> dict[str, str]:
    return {s["name"]: s["state"] for s in ledger.stages(run_id)}


def _stage(ledger: Ledger, run_id: str, name: str) -> dict:
    return next(s for s in ledger.stages(run_id) if s["name"] == name)


def _run_without_torch(overrides: list[str]) -> dict:
    """`trainpipe.run` in a fresh interpreter that fails if torch (or any training library) got imported."""
    code = (
        "import json, sys\n"
        "import trainpipe\n"
        f"result = trainpipe.run({str(QUICKSTART)!r}, overrides={overrides!r})\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]\n"
        "print(json.dumps({'run_id': result.run_id, 'state': result.state, 'heavy': heavy,"
        " 'final': result.final_model_path}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Loaded by every Python process started with its folder on PYTHONPATH (the CLI, the pre-imported
# worker, stage processes): an audit hook that records, without changing anything, each process that
# loads torch.
TORCH_WATCH = """import os, sys

def _watch(event, args):
    if event == "import" and args[0] == "torch":
        with open(os.environ["TP_TORCH_IMPORTS"], "a") as out:
            out.write(f"{os.getpid()} {' '.join(sys.orig_argv)}\\n")

sys.addaudithook(_watch)
"""


def _cli_torch_imports(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the CLI; return it and one line (pid, command) per process of it that imported torch."""
    hook = tmp_path / "torch-watch"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(TORCH_WATCH)
    record = tmp_path / f"torch-imports-{len(list(tmp_path.glob('torch-imports-*')))}"
    record.touch()
    env = {**os.environ, "TP_TORCH_IMPORTS": str(record),
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "trainpipe.cli.app", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    return proc, record.read_text().splitlines()


@pytest.mark.slow
def test_rerun_reuses_every_stage_and_retrains_only_what_must(tmp_path, db_url):
    overrides = fast_overrides(tmp_path / "out")
    ledger = Ledger(db_url)

    first = trainpipe.run(QUICKSTART, overrides=overrides)
    assert first.state == "succeeded", first.errors
    assert _trained(ledger, first.run_id) == ["sft", "merge", "dpo"]
    fingerprints = {s["name"]: s["fingerprint"] for s in ledger.stages(first.run_id)}
    assert all(fingerprints.values()) and len(set(fingerprints.values())) == 3

    # 1. Identical config: nothing trains, nothing imports torch, every stage is linked to run 1.
    second = _run_without_torch(overrides)
    assert second["state"] == "succeeded" and second["heavy"] == []
    run2 = second["run_id"]
    assert _states(ledger, run2) == {"sft": "cached", "merge": "cached", "dpo": "cached"}
    assert ledger.attempts(run2) == []
    for name in ("sft", "merge", "dpo"):
        row = _stage(ledger, run2, name)
        assert (row["cached_from_run"], row["cached_from_stage"]) == (first.run_id, name)
        assert row["fingerprint"] == fingerprints[name]
    # The run's own directory holds the outputs (hard links), and its final model is its own.
    run2_dir = Path(ledger.get_run(run2)["run_dir"])
    assert second["final"] == str(run2_dir / "dpo" / "merged")
    adapter = run2_dir / "dpo" / "adapter_model.safetensors"
    assert adapter.read_bytes() == (Path(first.run_dir) / "dpo" / "adapter_model.safetensors").read_bytes()
    # Gate results are carried over, marked as such, with every check.
    gates = ledger.gates(run2)
    assert [(g["stage"], g["carried_from"], bool(g["passed"])) for g in gates] == [
        ("sft", first.run_id, True), ("merge", first.run_id, True), ("dpo", first.run_id, True)]
    assert [c["name"] for c in gates[2]["checks"]] == [c["name"] for c in ledger.gates(first.run_id)[2]["checks"]]
    moves = [(t["stage"], t["trigger"]) for t in ledger.transitions(run2) if t["stage"]]
    assert moves == [("sft", "reuse_cached"), ("merge", "reuse_cached"), ("dpo", "reuse_cached")]
    result = json.loads((run2_dir / "pipeline_result.json").read_text())
    assert result["success"] and result["stages_completed"] == ["sft", "merge", "dpo"]
    assert result["stage_results"]["dpo"]["source"] == "cached"
    assert result["stage_results"]["dpo"]["reused_from"]["run_id"] == first.run_id
    assert json.loads((run2_dir / "merged" / "merge_info.json").read_text())["merged_path"] == str(run2_dir / "merged")

    # 1b. The same through the CLI: no process it starts imports torch (no pre-imported worker). The
    #     watch itself is shown to see an import of torch first.
    control, seen = _cli_torch_imports(tmp_path, "--help")
    assert control.returncode == 0 and seen == [], seen
    probe = subprocess.run([sys.executable, "-c", "import torch"], env={
        **os.environ, "TP_TORCH_IMPORTS": str(tmp_path / "probe"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "torch-watch"), os.environ.get("PYTHONPATH", "")])})
    assert probe.returncode == 0 and "import torch" in (tmp_path / "probe").read_text()
    cli_rerun, seen = _cli_torch_imports(tmp_path, "run", str(QUICKSTART), "--json",
                                         *[a for o in overrides for a in ("--set", o)])
    assert cli_rerun.returncode == 0, cli_rerun.stdout + cli_rerun.stderr
    cli_run_id = json.loads(cli_rerun.stdout)["run_id"]
    assert _states(ledger, cli_run_id) == {"sft": "cached", "merge": "cached", "dpo": "cached"}
    assert seen == [], f"processes that imported torch during a fully cached CLI run: {seen}"

    # 2. --from-stage dpo: SFT and merge come from the cache, DPO trains.
    third = trainpipe.run(QUICKSTART, overrides=overrides, from_stage="dpo")
    assert third.state == "succeeded", third.errors
    assert _states(ledger, third.run_id) == {"sft": "cached", "merge": "cached", "dpo": "passed"}
    assert _trained(ledger, third.run_id) == ["dpo"]
    assert "--from-stage" in _stage(ledger, third.run_id, "dpo")["cache_note"]

    # 3. Every earlier DPO output damaged: run 1's adapter altered in place (run 2 hard-linked the same
    #    file, so its copy changed too) and run 3's deleted. DPO trains again, and the ledger says why.
    with (Path(first.run_dir) / "dpo" / "adapter_model.safetensors").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    (Path(third.run_dir) / "dpo" / "adapter_model.safetensors").unlink()
    fourth = trainpipe.run(QUICKSTART, overrides=overrides)
    assert fourth.state == "succeeded", fourth.errors
    assert _states(ledger, fourth.run_id) == {"sft": "cached", "merge": "cached", "dpo": "passed"}
    assert _trained(ledger, fourth.run_id) == ["dpo"]
    note = _stage(ledger, fourth.run_id, "dpo")["cache_note"]
    assert f"run {third.run_id}'s dpo output lost adapter_model.safetensors (file missing)" in note
    assert f"run {first.run_id}'s dpo output changed: adapter_model.safetensors" in note
    assert f"run {run2}'s dpo output changed" in note
    report = trainpipe_inspect(fourth.run_id)
    dpo = next(s for s in report["stages"] if s["name"] == "dpo")
    assert dpo["source"] == "trained" and dpo["cache_note"] == note
    sft = next(s for s in report["stages"] if s["name"] == "sft")
    assert sft["source"] == "cached" and sft["cached_from"]["trained_in"] == first.run_id

    # 4. --no-cache trains SFT although run 1's SFT has the same fingerprint. DPO is off to keep this
    #    short; SFT's fingerprint does not depend on it (gate 3's settings belong to DPO). A changed
    #    dpo.beta retraining only DPO is shown by every trial after the first in tests/test_sweep.py.
    fifth = trainpipe.run(QUICKSTART, overrides=overrides + ["stages.dpo.enabled=false"], use_cache=False)
    assert fifth.state == "succeeded", fifth.errors
    assert _trained(ledger, fifth.run_id) == ["sft", "merge"]
    sft = _stage(ledger, fifth.run_id, "sft")
    assert sft["fingerprint"] == fingerprints["sft"] and "--no-cache" in sft["cache_note"]
    assert ledger.get_run(fifth.run_id)["cache_policy"] == {"use_cache": False, "from_stage": None}


def trainpipe_inspect(run_id: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "trainpipe.cli.app", "inspect", run_id, "--json"],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_from_stage_names_an_unknown_or_disabled_stage_exits_2(tmp_path, db_url):
    from helpers import cli

    proc = cli("run", str(QUICKSTART), "--from-stage", "dpoo", "--set", f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "--from-stage dpoo: no such stage" in proc.stderr
    proc = cli("run", str(QUICKSTART), "--from-stage", "dpo", "--set", "stages.dpo.enabled=false",
               "--set", f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "stage 'dpo' is disabled" in proc.stderr
    assert Ledger(db_url).count_runs() == 0


def _fingerprints(overrides: list[str]) -> dict[str, str]:
    config = load_config(QUICKSTART, overrides=overrides)
    sft = stage_fingerprint(config, "sft", None)
    merge = stage_fingerprint(config, "merge", sft)
    return {"sft": sft, "merge": merge, "dpo": stage_fingerprint(config, "dpo", merge)}


def test_fingerprint_ignores_what_cannot_change_the_result(tmp_path):
    base = _fingerprints([])
    assert _fingerprints([f"output_dir={tmp_path}", "checkpoint_every_n_steps=7", "sft.logging_steps=5",
                          "sft.save_steps=3", "stages.sft.timeout_minutes=99", "stages.dpo.retry_count=3",
                          "validation.checks.adapter_loads.timeout_s=5", "save_intermediate=false",
                          "sft.beta=0.7"]) == base


def test_fingerprint_follows_settings_data_and_upstream(tmp_path):
    base = _fingerprints([])
    # A DPO setting, or gate 3's threshold, changes DPO only.
    for override in ("dpo.beta=0.3", "validation.min_accuracy=0.5", "validation.format_threshold=0.5"):
        changed = _fingerprints([override])
        assert (changed["sft"], changed["merge"]) == (base["sft"], base["merge"]) and changed["dpo"] != base["dpo"]
    # An SFT setting, gate 1's threshold, the seed or the SFT data change every stage (through upstream).
    data = tmp_path / "sft.jsonl"
    text = (QUICKSTART.parent.parent / "examples" / "task_api" / "sft.jsonl").read_text(encoding="utf-8")
    data.write_text(text.replace("task", "Task", 1), encoding="utf-8")
    for override in ("sft.learning_rate=1e-3", "validation.max_loss=3", "seed=7", f"datasets.sft={data}"):
        changed = _fingerprints([override])
        assert all(changed[s] != base[s] for s in base), override
    # merge.dtype changes merge and what follows it.
    changed = _fingerprints(["merge.dtype=bfloat16"])
    assert changed["sft"] == base["sft"] and changed["merge"] != base["merge"] and changed["dpo"] != base["dpo"]


def test_base_model_identity_sees_a_file_changed_since_it_was_hashed(tmp_path):
    """The identity of a local base model is hashed once per process and reused (engine/fingerprint.py);
    a file rewritten since, even to the same size, must still change it."""
    from trainpipe.engine.identity import base_model_identity

    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    (model / "config.json").write_text("{}")
    first = base_model_identity(str(model))
    assert base_model_identity(str(model)) == first
    weights.write_bytes(b"b" * 4096)  # same size, new content and mtime
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert base_model_identity(str(model)) != first


TASK_API_DIR = QUICKSTART.parent.parent / "examples" / "task_api"


def _changed_copy(tmp_path: Path, name: str) -> Path:
    """A copy of a shipped file with one character changed: same rows, same format, other content."""
    copy = tmp_path / f"changed-{name}"
    text = (TASK_API_DIR / name).read_text(encoding="utf-8")
    copy.write_text(text.replace("e", "E", 1), encoding="utf-8")
    return copy


# What each stage's output depends on beyond its own settings (docs/cache-and-sweeps.md, "Stage cache"): each input
# changed alone, and the stages whose fingerprint must change with it. SFT's change carries on to
# merge and DPO through `upstream`; gate 3 (DPO's) reads the eval and red-team sets.
INPUTS = {
    "datasets.preference": (lambda tmp: f"datasets.preference={_changed_copy(tmp, 'preference.jsonl')}", {"dpo"}),
    "datasets.preference_eval": (
        lambda tmp: f"datasets.preference_eval={_changed_copy(tmp, 'preference_eval.jsonl')}", {"dpo"}),
    "datasets.eval": (lambda tmp: f"datasets.eval={_changed_copy(tmp, 'eval.jsonl')}", {"sft", "merge", "dpo"}),
    "validation.redteam_file": (
        lambda tmp: f"validation.redteam_file={_changed_copy(tmp, 'redteam.jsonl')}", {"dpo"}),
    "trust_remote_code": (lambda tmp: "trust_remote_code=true", {"sft", "merge", "dpo"}),
    "backend": (lambda tmp: "backend=unsloth", {"sft", "merge", "dpo"}),
}


@pytest.mark.parametrize("what", sorted(INPUTS))
def test_fingerprint_follows_each_input(what, tmp_path):
    override, stages = INPUTS[what]
    base = _fingerprints([])
    changed = _fingerprints([override(tmp_path)])
    assert {stage for stage in base if changed[stage] != base[stage]} == stages


@pytest.mark.parametrize("package", ["torch", "transformers", "trl", "peft", "trainpipe"])
def test_fingerprint_follows_each_library_version(package, monkeypatch):
    import importlib.metadata

    base = _fingerprints([])
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: real(name) + ".post1" if name == package else real(name))
    changed = _fingerprints([])
    assert all(changed[stage] != base[stage] for stage in base), package


@pytest.mark.parametrize("how", ["ATEN_CPU_CAPABILITY", "cuda"])
def test_fingerprint_follows_the_cpu_kernel_and_the_device(how, monkeypatch):
    from trainpipe.engine import fingerprint

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    base = _fingerprints([])
    if how == "ATEN_CPU_CAPABILITY":
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    else:
        monkeypatch.setattr(fingerprint, "cuda_device_visible", lambda: True)
    changed = _fingerprints([])
    assert all(changed[stage] != base[stage] for stage in base), how


def test_fingerprint_follows_a_local_base_models_content_not_its_path(tmp_path):
    from trainpipe.stages.tiny_model import ASSET_DIR

    model = tmp_path / "model"
    shutil.copytree(ASSET_DIR, model)
    base = _fingerprints([f"base_model={model}"])
    # The same files elsewhere: the same model.
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(model, moved)
    assert _fingerprints([f"base_model={moved}"]) == base
    # One byte of the weights changed, size unchanged.
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    changed = _fingerprints([f"base_model={model}"])
    assert all(changed[stage] != base[stage] for stage in base)


@pytest.mark.slow
@pytest.mark.extended
def test_origin_deleted_after_a_hard_linked_reuse_and_the_newest_candidate_damaged(tmp_path, db_url):
    """SFT and merge (DPO off to keep it short). Run 2 reuses both from run 1 through hard links; run 1's
    directory is then deleted, and nothing breaks: run 3 reuses SFT from run 2 and trains merge on it.
    Then the newest SFT candidate (run 3's) loses a file: run 4 reuses the older one, run 2's."""
    overrides = fast_overrides(tmp_path / "out") + ["stages.dpo.enabled=false"]
    ledger = Ledger(db_url)
    first = trainpipe.run(QUICKSTART, overrides=overrides)
    assert first.state == "succeeded", first.errors
    second = trainpipe.run(QUICKSTART, overrides=overrides)
    assert second.state == "succeeded", second.errors
    assert _states(ledger, second.run_id) == {"sft": "cached", "merge": "cached", "dpo": "skipped"}
    adapter2 = Path(second.run_dir) / "sft" / "adapter_model.safetensors"
    merged2 = Path(second.run_dir) / "merged" / "model.safetensors"
    assert adapter2.stat().st_ino == (Path(first.run_dir) / "sft" / "adapter_model.safetensors").stat().st_ino
    merged_bytes = merged2.read_bytes()

    shutil.rmtree(first.run_dir)

    # Run 2 still holds its whole output: every recorded file is there with its sha256.
    verified = subprocess.run([sys.executable, "-m", "trainpipe.cli.app", "verify", second.run_id, "--json"],
                              capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    third = trainpipe.run(QUICKSTART, overrides=overrides, from_stage="merge")
    assert third.state == "succeeded", third.errors
    assert _states(ledger, third.run_id) == {"sft": "cached", "merge": "passed", "dpo": "skipped"}
    assert _stage(ledger, third.run_id, "sft")["cached_from_run"] == second.run_id
    # Merge trained in run 3, read SFT from run 3's own dir, and made the same model as run 1 did.
    assert len(ledger.attempts(third.run_id, "merge")) == 1
    assert json.loads((Path(third.run_dir) / "merged" / "merge_info.json").read_text())["adapter_path"] == str(
        Path(third.run_dir) / "sft")
    assert (Path(third.run_dir) / "merged" / "model.safetensors").read_bytes() == merged_bytes

    # The newest candidate is run 3's SFT; it loses a file.
    newest, older = ledger.cache_candidates("sft", _stage(ledger, third.run_id, "sft")["fingerprint"],
                                            exclude_run="none")[:2]
    assert (newest["run_id"], older["run_id"]) == (third.run_id, second.run_id)
    (Path(third.run_dir) / "sft" / "adapter_model.safetensors").unlink()
    fourth = trainpipe.run(QUICKSTART, overrides=overrides)
    assert fourth.state == "succeeded", fourth.errors
    assert _trained(ledger, fourth.run_id) == []
    assert _stage(ledger, fourth.run_id, "sft")["cached_from_run"] == second.run_id
    assert (Path(fourth.run_dir) / "sft" / "adapter_model.safetensors").read_bytes() == adapter2.read_bytes()
