"""`trainpipe sweep` for real: trials are runs in the ledger, shared stages train once, bad sweep files
are refused before anything is written, and a SIGKILLed sweep resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import QUICKSTART, REPO_ROOT, fast_overrides
from helpers import (assert_continued_from_checkpoint, cli, process_alive, started_pid, trainer_steps,
                     wait_for)

from trainpipe.store.ledger import Ledger
from trainpipe.config.sweepfile import load_sweep

pytestmark = pytest.mark.slow


def _sweep_file(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": str(QUICKSTART), **fields}), encoding="utf-8")
    return path


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _assert_real_png(path: Path) -> None:
    """A PNG file that decodes to an image of the plot's size (6 x 3.5 in at matplotlib's 100 dpi),
    with more than one colour in it: not an empty or truncated file that merely has the name."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = imread(path)
    assert pixels.shape[:2] == (350, 600), pixels.shape
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::97].tolist()}) > 2


def _trainings(ledger: Ledger, run_ids: list[str]) -> dict[str, int]:
    """How many times each stage trained across these runs (a stage with attempts in a run trained there)."""
    counts = {"sft": 0, "merge": 0, "dpo": 0}
    for run_id in run_ids:
        for stage in {a["stage"] for a in ledger.attempts(run_id)}:
            counts[stage] += 1
    return counts


def test_beta_sweep_killed_resumes_trains_shared_stages_once_and_never_chooses_a_rejected_trial(tmp_path, db_url):
    # The custom check rejects beta 0.05 at gate 3 and reports beta as its value; the objective
    # minimizes that value, so a sweep that could pick a rejected trial would pick beta 0.05.
    sweep = _sweep_file(tmp_path, name="beta", space={"dpo.beta": [0.05, 0.1, 0.3]}, strategy="grid",
                        objective={"metric": "gate.trainpipe_test_checks:rejects_low_beta",
                                   "direction": "minimize"}, max_trials=3)
    overrides = fast_overrides(tmp_path / "out") + [
        "validation.custom_checks=[output_format_valid, no_harmful_content, trainpipe_test_checks:rejects_low_beta]"]
    # The orchestrator, which is the sweep process, is SIGKILLed right after it records the first
    # trial's DPO checkpoint at step 4 (the stage process dies with it).
    env = os.environ.copy()
    env["TRAINPIPE_FAULT"] = json.dumps({"action": "kill_orchestrator", "at": "dpo:checkpoint", "step": 4,
                                         "once_file": str(tmp_path / "fired")})
    killed = subprocess.run([sys.executable, "-m", "trainpipe.cli.app", "sweep", str(sweep), *_sets(overrides)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    sweep_id = killed.stdout.split()[1]
    ledger = Ledger(db_url)
    # A grid's trials are all recorded up front; the first was running when the sweep died.
    assert [t["state"] for t in ledger.sweep_trials(sweep_id)] == ["running", "pending", "pending"]
    assert json.loads(cli("sweep-status", sweep_id, "--json", check=True).stdout)["state"] == "interrupted"

    proc = cli("sweep", "--resume", sweep_id)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ledger.get_sweep(sweep_id)["state"] == "finished"
    trials = ledger.sweep_trials(sweep_id)
    assert [t["state"] for t in trials] == ["done", "done", "done"]
    assert sorted(t["params"]["dpo.beta"] for t in trials) == [0.05, 0.1, 0.3]
    runs = [t["run_id"] for t in trials]
    assert {ledger.get_run(r)["state"] for r in runs} == {"succeeded", "rejected"}
    # The killed trial's DPO continued from its checkpoint rather than starting over: checkpoint-4,
    # or a later one the stage process completed between the orchestrator's death and its own, which
    # resume adopts once its manifest verifies (resume_point.adopt_unrecorded_checkpoints).
    first = ledger.attempts(runs[0], "dpo")
    assert len(first) == 2 and first[1]["resumed_from"], first
    assert assert_continued_from_checkpoint(ledger, runs[0], "dpo") >= 4
    # Shared prefix: SFT and merge trained once, by the first trial; DPO once per trial.
    assert _trainings(ledger, runs) == {"sft": 1, "merge": 1, "dpo": 3}
    for run_id in runs[1:]:
        states = {s["name"]: s["state"] for s in ledger.stages(run_id)}
        assert states["sft"] == states["merge"] == "cached"
    # The rejected trial is in the table, never the best.
    status = json.loads(cli("sweep-status", sweep_id, "--json", check=True).stdout)
    assert status["state"] == "finished" and len(status["trials"]) == 3
    rejected = next(r for r in status["trials"] if r["params"]["dpo.beta"] == 0.05)
    assert rejected["state"] == "rejected" and rejected["gates"]["dpo"] == "rejected"
    assert rejected["objective"] == 0.05 and not rejected["best"]
    assert status["best"]["params"] == {"dpo.beta": 0.1}
    assert ledger.get_sweep(sweep_id)["best_trial"] == status["best"]["number"]
    assert status["stage_trainings"] == {"sft": 1, "merge": 1, "dpo": 3}
    out = Path(status["outputs"]["dir"])
    table = (out / "comparison.md").read_text()
    assert table.count("\n") == 5 and "(best)" in table and "rejected" in table
    assert json.loads((out / "results.json").read_text())["best"]["run_id"] == status["best"]["run_id"]
    _assert_real_png(out / "objective.png")
    assert f"best config: {out / 'best_config.yaml'}" in proc.stdout
    again = cli("sweep", "--resume", sweep_id)
    assert again.returncode == 2 and "finished" in again.stderr

    # The best config is a runnable pipeline file; with everything cached it trains nothing.
    rerun = cli("run", str(out / "best_config.yaml"), "--json")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    run_id = json.loads(rerun.stdout)["run_id"]
    assert ledger.attempts(run_id) == []
    assert next(s for s in ledger.stages(run_id) if s["name"] == "dpo")["cached_from_run"] == status["best"]["run_id"]


def test_a_sigkilled_workers_trial_is_claimed_by_another_worker_that_resumes_it_from_its_checkpoint(tmp_path, db_url):
    """One trial, SFT only (6 steps, a checkpoint every 2). The sweep process, which holds the trial,
    is SIGKILLed at step 3, after checkpoint-2; a `sweep --worker` then claims the abandoned trial,
    resumes its run from checkpoint-2 and finishes the sweep."""
    sweep = _sweep_file(tmp_path, name="takeover", space={"sft.learning_rate": [5e-3]},
                        objective={"metric": "sft.final_loss", "direction": "minimize"})
    overrides = fast_overrides(tmp_path / "out") + ["stages.merge.enabled=false", "stages.dpo.enabled=false",
                                                    "sft.max_steps=6", "checkpoint_every_n_steps=2"]
    env = os.environ.copy()
    env["TRAINPIPE_FAULT"] = json.dumps({"stage": "sft", "step": 3, "action": "pause", "seconds": 120,
                                         "once_file": str(tmp_path / "fired")})
    first = subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "sweep", str(sweep), *_sets(overrides)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ledger = Ledger(db_url)
    try:
        wait_for(lambda: (tmp_path / "fired").exists(), what="the trial's SFT to reach step 3")
        (sweep_row,) = ledger.list_sweeps()
        sweep_id = sweep_row["sweep_id"]
        (trial,) = ledger.sweep_trials(sweep_id)
        # Killed once the sweep process has recorded checkpoint-2 (it reads the stage's events as they come).
        wait_for(lambda: ledger.checkpoints(trial["run_id"], "sft"), timeout=60, what="checkpoint-2 recorded")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    (trial,) = ledger.sweep_trials(sweep_id)
    assert trial["state"] == "running" and trial["owner_pid"] == first.pid, trial
    run = ledger.get_run(trial["run_id"])
    # The stage process dies with its orchestrator: nothing of the first worker trains on.
    stage_pid = started_pid(run["run_dir"], "sft", 1)
    wait_for(lambda: not process_alive(stage_pid), timeout=30, what="the stage process to die with its sweep")
    assert [c["step"] for c in ledger.checkpoints(trial["run_id"], "sft")] == [2]

    second = subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "sweep", "--worker", sweep_id],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    output, _ = second.communicate(timeout=300)

    assert second.returncode == 0, output
    assert ledger.get_sweep(sweep_id)["state"] == "finished"
    (trial,) = ledger.sweep_trials(sweep_id)
    assert trial["state"] == "done" and trial["owner_pid"] == second.pid and trial["objective"] is not None
    # The ledger's own record of which process did what: the first worker started the run, the second
    # resumed it and moved it to succeeded.
    transitions = [t for t in ledger.transitions(trial["run_id"]) if t["stage"] is None]
    assert transitions[0]["pid"] == first.pid
    resumes = [t for t in transitions if t["trigger"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["pid"] == second.pid, transitions
    assert transitions[-1]["to_state"] == "succeeded" and transitions[-1]["pid"] == second.pid, transitions
    assert [a["outcome"] for a in ledger.attempts(trial["run_id"], "sft")] == ["interrupted", "passed"]
    # The trainer of the second attempt began at checkpoint-2's step and went on to step 6.
    assert assert_continued_from_checkpoint(ledger, trial["run_id"], "sft") == 2
    assert trainer_steps(run["run_dir"], "sft", 2)[1] == [3, 4, 5, 6]
    out = Path(json.loads(cli("sweep-status", sweep_id, "--json", check=True).stdout)["outputs"]["dir"])
    assert json.loads((out / "results.json").read_text())["best"]["run_id"] == trial["run_id"]


# On PostgreSQL too: trial claims, the stage lease and the reuse are compare-and-sets between processes.
# Both backends run in `make matrix` (CI's budget); the claims and the lease are also shown by the
# lease tests below and by tests/test_concurrency.py.
@pytest.mark.parametrize("db_url", [pytest.param("sqlite", marks=pytest.mark.extended),
                                    pytest.param("postgresql", marks=pytest.mark.extended)], indirect=True)
def test_parallel_workers_never_train_a_trial_or_a_shared_stage_twice(tmp_path, db_url):
    # Two trials that share SFT (merge off to keep it short), run by this process and one `--worker`.
    sweep = _sweep_file(tmp_path, name="par", space={"dpo.beta": [0.1, 0.3]},
                        objective={"metric": "dpo.rewards/accuracies", "direction": "maximize"})
    overrides = fast_overrides(tmp_path / "out") + ["stages.merge.enabled=false"]

    # Without a thread count of its own (CI sets one for its two suites side by side).
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = cli("sweep", str(sweep), "--parallel", "2", *_sets(overrides), env=env)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep_id = proc.stdout.split()[1]
    ledger = Ledger(db_url)
    trials = ledger.sweep_trials(sweep_id)
    assert [t["state"] for t in trials] == ["done", "done"] and ledger.get_sweep(sweep_id)["state"] == "finished"
    # Two workers, one trial each; each trial has exactly one run, and nothing ran twice within it.
    assert len({t["owner_pid"] for t in trials}) == 2
    runs = [t["run_id"] for t in trials]
    assert ledger.count_runs() == 2 and {ledger.get_run(r)["state"] for r in runs} == {"succeeded"}
    assert all(len(ledger.attempts(r, stage)) <= 1 for r in runs for stage in ("sft", "dpo"))
    # The shared SFT trained once: the trial that did not train it waited for the other's and reused it.
    assert _trainings(ledger, runs) == {"sft": 1, "merge": 0, "dpo": 2}
    trained = next(r for r in runs if ledger.attempts(r, "sft"))
    reused = next(r for r in runs if r != trained)
    (move,) = [t for t in ledger.transitions(reused) if t["trigger"] == "reuse_cached"]
    assert move["stage"] == "sft" and move["detail"]["source_run"] == trained
    assert move["detail"]["waited_for"] == trained, "the trials did not overlap: nothing was tested"
    assert ledger.stage_leases() == []
    # Each trial's stages ran on half the cores (as torch itself counted them), not one thread per
    # core each: two such processes spinning on the same cores ran 13x slower (benchmarks/RESULTS.md).
    cores = len(os.sched_getaffinity(0))
    assert f"--parallel 2 on {cores} CPU cores: each trial's stages use {max(1, cores // 2)} thread(s)" in proc.stdout
    threads = {a["metrics"]["cpu_threads"] for r in runs for a in ledger.attempts(r)}
    assert threads == {max(1, cores // 2)}, threads
    log = Path(json.loads(cli("sweep-status", sweep_id, "--json", check=True).stdout)["outputs"]["dir"])
    assert (log / "worker-1.log").is_file()


@pytest.mark.parametrize("fields, key, words", [
    ({"space": {"dpo.betta": [0.1]}}, "space.dpo.betta", "did you mean 'dpo.beta'"),
    ({"space": {"dpo.beta": [0.1]}, "objective": {"metric": "dpo.rewards/accuracy"}}, "objective.metric",
     "did you mean 'dpo.rewards/accuracies'"),
    ({"space": {"dpo.beta": [0.1]}, "objective": {"metric": "gate.no_such_check"}}, "objective.metric",
     "no gate of this pipeline runs a check 'no_such_check'"),
    ({"space": {}}, "space", "empty"),
    ({"space": {"dpo.beta": []}}, "space.dpo.beta", "empty list"),
    ({"space": {"dpo.beta": [0.1, 0.2, 0.3], "sft.lora_r": [4, 8]}, "max_trials": 5}, "max_trials",
     "the grid has 6 combinations, more than max_trials 5"),
    ({"space": {"dpo.beta": {"low": 0.05, "high": 0.5}}}, "space.dpo.beta", "needs a list of values"),
    ({"space": {"dpo.beta": [-1]}}, "space.dpo.beta", "value -1 is not accepted"),
    ({"space": {"dpo.beta": [0.1]}, "strategy": "random"}, "n_trials", "needs n_trials"),
    ({"space": {"dpo.beta": [0.1]}, "strategy": "random", "n_trials": 60}, "max_trials", "n_trials is 60"),
])
def test_bad_sweep_file_exits_2_naming_file_and_key(fields, key, words, tmp_path, db_url):
    fields.setdefault("objective", {"metric": "dpo.rewards/accuracies"})
    sweep = _sweep_file(tmp_path, **fields)

    proc = cli("sweep", str(sweep), "--set", f"output_dir={tmp_path / 'out'}")

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{sweep}: key '{key}'" in proc.stderr and words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    ledger = Ledger(db_url)
    assert ledger.count_runs() == 0 and not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="no sweep"):
        ledger.get_sweep("anything")


@pytest.mark.parametrize("name", ["sweep_beta.yaml", "sweep_lr_beta.yaml"])
def test_shipped_sweep_files_load(name):
    spec, config = load_sweep(REPO_ROOT / "configs" / name)
    assert config.pipeline_id == "quickstart" and spec.objective.metric


@pytest.mark.parametrize("strategy", ["random", "tpe"])
def test_sampler_replays_the_same_trials(strategy):
    """`sweep --resume` rebuilds the study by asking again and telling the recorded results: the
    seeded sampler must then propose exactly what it proposed the first time."""
    from trainpipe.engine.sweep_study import new_study, same_params, space_distributions
    from trainpipe.config.sweepfile import SweepSpec

    spec = SweepSpec.model_validate({
        "base": str(QUICKSTART), "strategy": strategy, "n_trials": 8, "seed": 3,
        "space": {"sft.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "dpo.beta": [0.05, 0.1, 0.3],
                  "sft.lora_r": {"low": 4, "high": 16, "step": 4}},
        "objective": {"metric": "dpo.rewards/accuracies"}})
    distributions = space_distributions(spec)

    def play(study, recorded=None):
        proposed = []
        for number in range(8):
            trial = study.ask(distributions)
            if recorded is not None:
                assert same_params(trial.params, recorded[number]), number
            proposed.append(dict(trial.params))
            study.tell(trial, trial.params["dpo.beta"] * 10 - abs(trial.params["sft.lora_r"] - 8))
        return proposed

    first = play(new_study(spec))
    assert play(new_study(spec), first) == first
    assert all(p["sft.lora_r"] in (4, 8, 12, 16) and isinstance(p["sft.lora_r"], int) for p in first)
    assert len({p["sft.learning_rate"] for p in first}) == 8


def test_on_a_gpu_only_the_trials_whose_memory_shares_fit_train_at_once() -> None:
    from trainpipe.engine.sweep import trials_that_fit

    assert trials_that_fit(4, 0.3, cuda=True) == 3
    assert trials_that_fit(4, 0.5, cuda=True) == 2
    assert trials_that_fit(2, 0.9, cuda=True) == 1
    assert trials_that_fit(4, 1.0, cuda=True) == 1
    assert trials_that_fit(3, 0.2, cuda=True) == 3
    assert trials_that_fit(4, 0.9, cuda=False) == 4  # CPU: N processes


def test_tpe_with_parallel_is_refused_before_anything_is_written(tmp_path, db_url):
    sweep = _sweep_file(tmp_path, name="tpe", strategy="tpe", n_trials=2,
                        space={"dpo.beta": {"low": 0.05, "high": 0.5}},
                        objective={"metric": "dpo.rewards/accuracies"})

    proc = cli("sweep", str(sweep), "--parallel", "2", "--set", f"output_dir={tmp_path / 'out'}")

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{sweep}: key 'strategy': tpe runs one trial at a time" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    ledger = Ledger(db_url)
    assert ledger.count_runs() == 0 and not (tmp_path / "out").exists()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("owner", ["alive", "pid gone", "stale heartbeat elsewhere", "run finished"])
def test_a_stage_lease_is_taken_over_only_from_a_run_that_is_gone(owner, db_url, tmp_path, monkeypatch):
    """The lease on training one fingerprint (reuse.take_lease): a run waits while the holder's run lives,
    and takes the lease over once its owner is gone (pid gone here, heartbeat stale from another
    host) or its run has ended."""
    import time

    from trainpipe.engine import liveness, reuse
    from trainpipe.engine.machine import next_state

    ledger = Ledger(db_url)
    for run_id in ("holder", "waiter"):
        ledger.create_run(run_id=run_id, pipeline_id="p", config_snapshot={}, config_path=None,
                          output_dir=str(tmp_path), run_dir=str(tmp_path / run_id), stages=["sft"])
        ledger.transition_run(run_id, "start", lambda cur: next_state("run", cur, "start"), set_owner=True)
    assert ledger.acquire_stage_lease("fp-sft", "sft", "holder") is None
    if owner == "pid gone":
        ledger.update_run("holder", owner_pid=_dead_pid())
    elif owner == "stale heartbeat elsewhere":
        monkeypatch.setattr(liveness, "STALE_AFTER_S", 30.0)
        ledger.update_run("holder", owner_host="another-node", heartbeat_at=time.time() - 60)
    elif owner == "run finished":
        ledger.transition_run("holder", "fail", lambda cur: next_state("run", cur, "fail"), clear_owner=True)

    holder = reuse.take_lease(ledger, "waiter", "sft", "fp-sft")

    (lease,) = ledger.stage_leases()
    if owner == "alive":
        assert holder is not None and holder["run_id"] == "holder" and lease["run_id"] == "holder"
    else:
        assert holder is None and lease["run_id"] == "waiter"
