"""Stages under torchrun (`launcher:`): 2 ranks on CPU with gloo, through torch.distributed's own
launcher. An uninterrupted 2-process SFT is the reference; a run whose orchestrator is SIGKILLed
mid-training and then resumed, and a run that loses a rank and retries, must both end on exactly
its adapter."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import QUICKSTART, resume_overrides
from helpers import assert_continued_from_checkpoint, cli, load_weights, only_run_id, start_run, wait_for

import trainpipe
from trainpipe import checkpoints
from trainpipe.config import load_config
from trainpipe.engine.fingerprint import stage_fingerprint
from trainpipe.engine.stage_process import torchrun_command
from trainpipe.store.ledger import Ledger

LAUNCHER = ["sft.launcher.type=torchrun", "sft.launcher.nproc_per_node=2"]


def ddp_overrides(output_dir: Path) -> list[str]:
    """SFT alone, 8 steps of 2 ranks x 8 rows, a checkpoint every 2 steps. Its gate is the final one,
    so the generation checks run on rank 0 after training."""
    return resume_overrides(output_dir) + ["sft.max_steps=8", "stages.merge.enabled=false",
                                           "stages.dpo.enabled=false", *LAUNCHER]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def adapter(run_dir: str | Path) -> dict:
    return load_weights(Path(run_dir) / "sft" / "adapter_model.safetensors")


def assert_resumed_to_reference(ledger: Ledger, run_id: str, outcomes: list[str], step: int,
                                reference: dict) -> None:
    """The run's SFT attempts ended as `outcomes`, the last one resumed from checkpoint-`step`, and
    the final adapter equals the uninterrupted reference's, tensor for tensor."""
    attempts = ledger.attempts(run_id, "sft")
    assert [a["outcome"] for a in attempts] == outcomes
    assert attempts[-1]["resumed_from"].endswith(f"checkpoint-{step}")
    # Rank 0's trainer began at that checkpoint's step and went on from there, not from step 1.
    assert assert_continued_from_checkpoint(ledger, run_id, "sft") == step
    assert_same_adapter(reference, adapter(ledger.get_run(run_id)["run_dir"]))


def assert_same_adapter(a: dict, b: dict) -> None:
    import torch

    assert set(a) == set(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[0]}"


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, model_cache):
    """One uninterrupted 2-process SFT run: (run result, its ledger url, its adapter)."""
    out = tmp_path_factory.mktemp("ddp-reference")
    db = f"sqlite:///{out / 'ledger.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRAINPIPE_DB", db)
        env.setenv("TRAINPIPE_CACHE", str(model_cache))
        env.setenv("TRAINPIPE_HOME", str(out / "home"))
        env.delenv("TRAINPIPE_FAULT", raising=False)
        result = trainpipe.run(QUICKSTART, overrides=ddp_overrides(out / "artifacts"))
    assert result.state == "succeeded", result.errors
    return result, db, adapter(result.run_dir)


# ---------------------------------------------------------------- settings (no training)


def test_launcher_settings_dump_and_validation(tmp_path, db_url):
    config = load_config(QUICKSTART, overrides=LAUNCHER)
    # Other code (the lineage record) reads the world size from exactly this dict.
    assert config.sft.launcher.model_dump() == {"type": "torchrun", "nproc_per_node": 2, "nnodes": 1,
                                                "rdzv_endpoint": None}
    assert config.model_dump(mode="json")["sft"]["launcher"]["nproc_per_node"] == 2  # in the run's snapshot
    assert config.dpo.launcher is None and load_config(QUICKSTART).sft.launcher is None

    proc = cli("run", str(QUICKSTART), "--set", f"output_dir={tmp_path}", *[a for s in LAUNCHER for a in ("--set", s)],
               "--set", "sft.launcher.nnodes=2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "sft.launcher" in proc.stderr and "rdzv_endpoint" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("run", str(QUICKSTART), "--set", f"output_dir={tmp_path}", "--set", "merge.launcher.type=torchrun")
    assert proc.returncode == 2 and "unknown key 'merge.launcher'" in proc.stderr, proc.stderr
    assert Ledger(db_url).count_runs() == 0


def test_example_config_is_the_quickstart_on_two_ranks():
    ddp = load_config(QUICKSTART.parent / "quickstart_ddp.yaml")
    plain = load_config(QUICKSTART)
    assert ddp.sft.launcher.model_dump()["nproc_per_node"] == 2 and ddp.dpo.launcher is None
    # Same global batch per optimizer step as the single-process quickstart.
    assert ddp.sft.batch_size * ddp.sft.gradient_accumulation * 2 == \
        plain.sft.batch_size * plain.sft.gradient_accumulation
    same = {"launcher", "batch_size"}
    assert ddp.sft.model_dump(exclude=same) == plain.sft.model_dump(exclude=same)


def test_launcher_changes_the_fingerprint():
    plain = load_config(QUICKSTART)
    two = load_config(QUICKSTART, overrides=LAUNCHER)
    four = load_config(QUICKSTART, overrides=[*LAUNCHER, "sft.launcher.nnodes=2",
                                              "sft.launcher.rdzv_endpoint=node0:29500"])
    prints = {stage_fingerprint(c, "sft", None) for c in (plain, two, four)}
    assert len(prints) == 3


def test_torchrun_command(tmp_path):
    spec = tmp_path / "spec-1.json"
    single = torchrun_command({"type": "torchrun", "nproc_per_node": 2, "nnodes": 1, "rdzv_endpoint": None}, spec)
    assert single[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in single
    assert single[-3:] == ["-m", "trainpipe.attempt.worker", str(spec)]
    multi = torchrun_command({"type": "torchrun", "nproc_per_node": 4, "nnodes": 2, "rdzv_endpoint": "node0:29500"},
                             spec)
    joined = " ".join(multi)
    # Several nodes: a static rendezvous at node 0, so global rank 0 is on the orchestrator's node.
    assert "--nproc_per_node 4 --nnodes 2" in joined and "--node_rank 0 --master_addr node0 --master_port 29500" in joined
    assert "--standalone" not in multi and "--rdzv_backend" not in multi
    assert "--node_rank 1 " in " ".join(torchrun_command({"type": "torchrun", "nproc_per_node": 4, "nnodes": 2,
                                                          "rdzv_endpoint": "node0:29500"}, spec, node_rank=1))
    one = torchrun_command({"type": "torchrun", "nproc_per_node": 2, "nnodes": 1, "rdzv_endpoint": "h:1234"}, spec)
    assert "--rdzv_backend c10d --rdzv_endpoint h:1234" in " ".join(one)


# The end of a stage log as torchrun 2.13 wrote it when rank 1 was SIGKILLed and rank 0 then exited 1:
# both observed in the same second, and torchrun named rank 0 the root cause.
_TORCHRUN_SUMMARY = """\
============================================================
trainpipe.attempt.worker FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-01_14:38:01
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 13677)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 13677
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_14:38:01
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : {root_code} (pid: 13676) {root_signal}
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_root_cause_is_the_rank_a_signal_ended_not_the_peer_that_lost_it(tmp_path):
    from trainpipe.engine.supervisor import _root_cause

    log = tmp_path / "stage.log"
    log.write_text("an earlier attempt's summary:\n" + _TORCHRUN_SUMMARY.replace("-9 (pid", "1 (pid").replace(
        "(SIGKILL)\n  error", "\n  error").format(root_code=-15, root_signal="(SIGTERM)") + "training...\n"
        + _TORCHRUN_SUMMARY.format(root_code=1, root_signal=""))
    assert _root_cause(log) == " (rank 1, exit code -9, SIGKILL)"
    log.write_text(_TORCHRUN_SUMMARY.replace("-9 (pid", "1 (pid").format(root_code=1, root_signal=""))
    assert _root_cause(log) == " (rank 0, exit code 1)", "no rank was signalled: torchrun's own pick"
    log.write_text("no summary at all\n")
    assert _root_cause(log) == ""


def test_checkpoint_without_every_rank_rng_state_is_refused(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    (ckpt / "rng_state_0.pth").write_bytes(b"r0")
    checkpoints.write_manifest(ckpt, 2, world_size=2)
    assert "rng_state_1.pth" in checkpoints.verify(ckpt)
    (ckpt / "rng_state_1.pth").write_bytes(b"r1")
    checkpoints.write_manifest(ckpt, 2, world_size=2)
    assert checkpoints.verify(ckpt) is None
    assert checkpoints.verify(ckpt, world_size=2) is None
    # A resume forced past a world-size change does not continue another world size's checkpoint.
    assert checkpoints.verify(ckpt, world_size=1) == "saved by 2 rank(s), and this attempt runs 1"


# ---------------------------------------------------------------- real 2-rank training

@pytest.mark.slow
def test_two_rank_sft_trains_under_torchrun(ddp_reference):
    result, db, weights = ddp_reference
    ledger = Ledger(db)
    attempts = ledger.attempts(result.run_id, "sft")
    assert [(a["outcome"], a["worker"]) for a in attempts] == [("passed", "torchrun")]
    metrics = attempts[0]["metrics"]
    assert metrics["world_size"] == 2 and metrics["ddp_backend"] == "gloo"
    assert metrics["total_steps"] == 8 and metrics["samples_processed"] == 8 * 8 * 2  # 2 ranks x batch 8
    # Rank 0 alone recorded: one checkpoint row per save, each listing both ranks' RNG state.
    steps = [c["step"] for c in ledger.checkpoints(result.run_id, "sft")]
    assert steps == [2, 4, 6, 8]
    manifest = json.loads((Path(ledger.checkpoints(result.run_id, "sft")[0]["path"]) / checkpoints.MANIFEST)
                          .read_text())
    assert manifest["world_size"] == 2 and {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest["files"])
    work = Path(result.run_dir) / ".work" / "sft"
    assert not list(work.glob("result-*.rank*.json"))  # no rank failed
    assert weights
    # The run's snapshot keeps the launcher: what a resume compares its world size against.
    assert ledger.get_run(result.run_id)["config_snapshot"]["sft"]["launcher"] == {
        "type": "torchrun", "nproc_per_node": 2, "nnodes": 1, "rdzv_endpoint": None}


@pytest.mark.slow
def test_orchestrator_sigkill_mid_ddp_training_resumes_identical(tmp_path, db_url, ddp_reference):
    # Rank 0 pauses at step 5 (after checkpoint-4); rank 1 waits for it in the next collective.
    fault = {"stage": "sft", "step": 5, "action": "pause", "seconds": 120, "once_file": str(tmp_path / "fired")}
    proc = start_run(QUICKSTART, ddp_overrides(tmp_path / "out"), fault)
    wait_for(lambda: (tmp_path / "fired").exists(), what="SFT to reach step 5")
    run_id = only_run_id(db_url)
    ledger = Ledger(db_url)
    wait_for(lambda: any(c["step"] == 4 for c in ledger.checkpoints(run_id, "sft")), what="checkpoint-4 recorded")
    torchrun_pid = ledger.attempts(run_id, "sft")[0]["pid"]
    work = Path(ledger.get_run(run_id)["run_dir"]) / ".work" / "sft"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # torchrun dies with the orchestrator, and both ranks with torchrun: nothing trains on unobserved.
    wait_for(lambda: not _alive(torchrun_pid), timeout=30, what="torchrun to die with the orchestrator")
    wait_for(lambda: not _stage_processes(work), timeout=30, what="the ranks to die with torchrun")

    resumed = cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    attempts = ledger.attempts(run_id, "sft")
    assert [(a["outcome"], a["worker"]) for a in attempts] == [("interrupted", "torchrun"), ("passed", "torchrun")]
    assert attempts[1]["resumed_from"].endswith("checkpoint-4")
    assert assert_continued_from_checkpoint(ledger, run_id, "sft") == 4
    assert_same_adapter(ddp_reference[2], adapter(ledger.get_run(run_id)["run_dir"]))


@pytest.mark.slow
@pytest.mark.extended
def test_sigterm_reaches_every_rank_which_checkpoint_and_stop_then_resume_identical(tmp_path, db_url, ddp_reference):
    """SIGTERM to `trainpipe run`: torchrun forwards it to both ranks, which agree on the step to stop
    at, save a checkpoint there and exit; the run is interrupted, and resumes from that checkpoint."""
    # Rank 0 holds step 5 for a few seconds, so that the signal lands while both ranks are mid-stage;
    # the sleep is not cut short by the signal, and then both ranks stop at step 5 together.
    fault = {"stage": "sft", "step": 5, "action": "pause", "seconds": 8, "once_file": str(tmp_path / "fired")}
    proc = start_run(QUICKSTART, ddp_overrides(tmp_path / "out"), fault)
    wait_for(lambda: (tmp_path / "fired").exists(), what="SFT to reach step 5")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    run_id = only_run_id(db_url)
    ledger = Ledger(db_url)
    assert ledger.get_run(run_id)["state"] == "interrupted"
    [attempt] = ledger.attempts(run_id, "sft")
    assert (attempt["outcome"], attempt["worker"]) == ("interrupted", "torchrun")
    newest = max(ledger.checkpoints(run_id, "sft"), key=lambda c: c["step"])
    assert newest["step"] == 5 and checkpoints.verify(newest["path"]) is None  # both ranks' RNG state in it

    resumed = cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_resumed_to_reference(ledger, run_id, ["interrupted", "passed"], 5, ddp_reference[2])


@pytest.mark.slow
@pytest.mark.extended
def test_dead_rank_fails_the_attempt_and_the_retry_resumes_identical(tmp_path, db_url, ddp_reference):
    """Rank 1 is SIGKILLed at step 3. torchrun stops rank 0 and exits non-zero; the attempt fails as
    transient, and the retry (retry_count 1) resumes both ranks from checkpoint-2."""
    fault = {"stage": "sft", "step": 3, "rank": 1, "action": "sigkill", "once_file": str(tmp_path / "fired")}
    env = {**os.environ, "TRAINPIPE_FAULT": json.dumps(fault)}
    args = [a for s in ddp_overrides(tmp_path / "out") for a in ("--set", s)]
    proc = cli("run", str(QUICKSTART), *args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = only_run_id(db_url)
    attempts = Ledger(db_url).attempts(run_id, "sft")
    assert [(a["outcome"], a["worker"]) for a in attempts] == [("failed", "torchrun"), ("passed", "torchrun")]
    first = attempts[0]
    assert first["exit_code"] not in (0, None) and first["error_kind"] == "transient"
    assert "rank 1, exit code -9, SIGKILL" in first["error"], first["error"]  # torchrun's root cause
    assert attempts[1]["resumed_from"].endswith("checkpoint-2")
    assert assert_continued_from_checkpoint(Ledger(db_url), run_id, "sft") == 2
    assert_same_adapter(ddp_reference[2], adapter(Ledger(db_url).get_run(run_id)["run_dir"]))


@pytest.mark.slow
@pytest.mark.extended
def test_dead_rank_without_retries_fails_the_run(tmp_path, db_url):
    fault = {"stage": "sft", "step": 1, "rank": 1, "action": "sigkill"}
    env = {**os.environ, "TRAINPIPE_FAULT": json.dumps(fault)}
    args = [a for s in ddp_overrides(tmp_path / "out") + ["stages.sft.retry_count=0"] for a in ("--set", s)]
    proc = cli("run", str(QUICKSTART), *args, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # EXIT_STAGE_FAILED
    run_id = only_run_id(db_url)
    ledger = Ledger(db_url)
    assert ledger.get_run(run_id)["state"] == "failed"
    [attempt] = ledger.attempts(run_id, "sft")
    assert attempt["outcome"] == "failed" and attempt["worker"] == "torchrun" and attempt["exit_code"] != 0


@pytest.mark.slow
@pytest.mark.extended
def test_error_in_another_rank_is_the_attempts_error(tmp_path, db_url):
    """Rank 1 raises: its error (not rank 0's lost-peer error) is the attempt's, and as a bug it is
    not retried although retry_count is 1."""
    fault = {"stage": "sft", "step": 1, "rank": 1, "action": "crash"}
    env = {**os.environ, "TRAINPIPE_FAULT": json.dumps(fault)}
    proc = cli("run", str(QUICKSTART), *[a for s in ddp_overrides(tmp_path / "out") for a in ("--set", s)], env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    run_id = only_run_id(db_url)
    [attempt] = Ledger(db_url).attempts(run_id, "sft")
    assert attempt["outcome"] == "failed" and attempt["error_kind"] == "bug"
    assert attempt["error"].startswith("rank 1: RuntimeError: injected crash"), attempt["error"]


@pytest.mark.slow
@pytest.mark.extended
def test_timeout_stops_torchrun_and_every_rank(tmp_path, db_url, monkeypatch):
    """A rank that cannot stop in time (paused for 300 s) is still gone after the stage timeout:
    SIGTERM to torchrun's group, then SIGKILL after the grace period, and the ranks die with torchrun."""
    monkeypatch.setenv("TRAINPIPE_TERM_GRACE_S", "2")
    fault = {"stage": "sft", "step": 2, "action": "pause", "seconds": 300}
    env = {**os.environ, "TRAINPIPE_FAULT": json.dumps(fault)}
    args = [a for s in ddp_overrides(tmp_path / "out") + ["stages.sft.retry_count=0", "stages.sft.timeout_minutes=0.75"]
            for a in ("--set", s)]
    proc = cli("run", str(QUICKSTART), *args, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    run_id = only_run_id(db_url)
    ledger = Ledger(db_url)
    [attempt] = ledger.attempts(run_id, "sft")
    assert (attempt["outcome"], attempt["worker"]) == ("timed_out", "torchrun")
    assert "timed out after 45 s" in attempt["error"]
    assert not _alive(attempt["pid"])
    wait_for(lambda: not _stage_processes(Path(ledger.get_run(run_id)["run_dir"]) / ".work" / "sft"), timeout=10,
             what="every rank to be gone")


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by its parent) is dead for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _stage_processes(work_dir: Path) -> list[int]:
    """Live processes whose command line runs the stage worker on this run's spec (torchrun, ranks)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"trainpipe.attempt.worker" in cmdline and any(str(work_dir).encode() in part for part in cmdline) \
                and _alive(int(entry.name)):
            alive.append(int(entry.name))
    return alive


# ---------------------------------------------------------------- leaving the process group

# One rank of two. Each round is what a rank does at the end of a stage: a DDP model, a collective whose
# tensors gloo's worker thread may still be dropping, distributed.finish(), then the model freed.
_FINISH_ROUNDS = """
import datetime, os, sys, time
os.environ["WORLD_SIZE"] = "2"
import torch, torch.distributed as dist
from trainpipe.stages import distributed
rank, port, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=30))
for i in range(rounds):
    dist.init_process_group("gloo", store=dist.PrefixStore(f"round{i}", store), rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    gathered = [torch.empty(64) for _ in range(2)]
    dist.all_gather(gathered, torch.ones(64))
    distributed.finish()
    del model, gathered
if rank == 0:
    time.sleep(2)  # rank 1 is gone by now: the groups kept here must outlive their peer quietly, as in a gate
print("rounds done", flush=True)
os._exit(0)
"""


def test_leaving_the_process_group_cannot_deadlock(tmp_path):
    """Freeing a gloo group after a collective can deadlock (its destructor joins gloo's thread while
    holding the GIL that thread needs); finish() keeps the group. Without that, these rounds hung
    within 50 rounds in 4 of 4 tries on 2 cores, with the stacks of the stuck two-node rank."""
    port = _free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", _FINISH_ROUNDS, str(rank), str(port), "150"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [rank.communicate(timeout=60)[0] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert all("rounds done" in out for out in outputs), outputs


# ---------------------------------------------------------------- two nodes on one machine

def _two_node_overrides(output_dir: Path) -> list[str]:
    """The 2-rank reference again, as 1 rank on each of 2 "nodes" that meet at a loopback port."""
    port = _free_port()
    return resume_overrides(output_dir) + [
        "sft.max_steps=8", "stages.merge.enabled=false", "stages.dpo.enabled=false",
        "sft.launcher.type=torchrun", "sft.launcher.nproc_per_node=1", "sft.launcher.nnodes=2",
        f"sft.launcher.rdzv_endpoint=127.0.0.1:{port}"]


@contextmanager
def _two_nodes(tmp_path: Path, db_url: str, fault: dict | None = None, sets: tuple[str, ...] = (),
               env: dict[str, str] | None = None):
    """Node 0: `trainpipe run` (output in node0.log); node 1: `trainpipe join RUN_ID --node-rank 1`, a
    separate process that shares only the ledger and the run dir with node 0, as a second machine
    would on shared storage. Yields (run_id, node 0, node 1, env); both are killed on the way out."""
    # torchrun sets OMP_NUM_THREADS=1 only for nproc_per_node > 1; the reference's ranks ran with one.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if fault:
        env["TRAINPIPE_FAULT"] = json.dumps(fault)
    args = [a for s in [*_two_node_overrides(tmp_path / "out"), *sets] for a in ("--set", s)]
    with (tmp_path / "node0.log").open("w") as log0:
        node0 = subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "run", str(QUICKSTART), *args],
                                 stdout=log0, stderr=subprocess.STDOUT, env=env)
        node1 = None
        try:
            run_id = wait_for(lambda: only_run_id(db_url), timeout=120, what="node 0 to create the run")
            node1 = subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "join", run_id, "--node-rank", "1"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            yield run_id, node0, node1, env
        finally:
            for proc in (node0, node1):
                if proc is not None and proc.poll() is None:
                    proc.kill()


def _run_two_nodes(tmp_path: Path, db_url: str, fault: dict | None = None, sets: tuple[str, ...] = (),
                   env: dict[str, str] | None = None) -> tuple[str, int, str, int, str]:
    """Both nodes to the end: (run_id, node 0's exit code and output, node 1's exit code and output)."""
    with _two_nodes(tmp_path, db_url, fault, sets, env) as (run_id, node0, node1, _env):
        node0.wait(timeout=400)
        out1, _ = node1.communicate(timeout=120)
    return run_id, node0.returncode, (tmp_path / "node0.log").read_text(), node1.returncode, out1


@pytest.mark.slow
@pytest.mark.extended
def test_two_nodes_train_the_same_adapter_as_two_ranks_on_one(tmp_path, db_url, ddp_reference):
    # Rank 0's gate takes 8 s or more (a check that sleeps to its timeout): node 1 must leave its
    # torchrun alone until node 0's exits.
    slow = "trainpipe_test_checks:sleeps_past_its_timeout"
    run_id, code0, out0, code1, out1 = _run_two_nodes(tmp_path, db_url, sets=(
        f"validation.custom_checks=[output_format_valid, no_harmful_content, {slow}]",
        f"validation.checks.{slow}.timeout_s=8", f"validation.checks.{slow}.severity=warn"),
        # A short grace: a follower that took node 0's gate for the attempt's end would stop its
        # torchrun after 2 s, and node 0's torchrun would then wait 300 s at torchrun's exit barrier.
        env={"TRAINPIPE_TERM_GRACE_S": "4"})
    assert code0 == 0, out0
    assert code1 == 0, out1
    assert "sft: attempt 1: node 1's torchrun exited with 0" in out1, out1
    assert f"run {run_id}: succeeded; served 1 attempt(s)" in out1
    ledger = Ledger(db_url)
    [attempt] = ledger.attempts(run_id, "sft")
    assert attempt["outcome"] == "passed" and attempt["worker"] == "torchrun"
    assert attempt["metrics"]["world_size"] == 2 and attempt["metrics"]["ddp_backend"] == "gloo"
    # Node 0 alone wrote the ledger; the lineage counts both nodes' ranks.
    assert ledger.get_run(run_id)["lineage"]["world_size"]["sft"] == 2
    work = Path(ledger.get_run(run_id)["run_dir"]) / ".work" / "sft"
    assert (work / "stage-node1.log").stat().st_size > 0  # node 1's torchrun logged beside node 0's
    manifest = json.loads((Path(ledger.checkpoints(run_id, "sft")[-1]["path"]) / checkpoints.MANIFEST).read_text())
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest["files"])
    assert_same_adapter(ddp_reference[2], adapter(ledger.get_run(run_id)["run_dir"]))


@pytest.mark.slow
@pytest.mark.extended
def test_a_rank_dying_on_the_other_node_is_retried_from_the_checkpoint(tmp_path, db_url, ddp_reference):
    """Node 1's rank (global rank 1) is SIGKILLed at step 3: node 0's rank loses its peer, the attempt
    fails as transient, the retry resumes from checkpoint-2, and node 1 serves the retry too."""
    fault = {"stage": "sft", "step": 3, "rank": 1, "action": "sigkill", "once_file": str(tmp_path / "fired")}
    run_id, code0, out0, code1, out1 = _run_two_nodes(tmp_path, db_url, fault)
    assert code0 == 0, out0
    assert code1 == 0 and "served 2 attempt(s)" in out1, out1
    attempts = Ledger(db_url).attempts(run_id, "sft")
    assert [(a["outcome"], a["worker"]) for a in attempts] == [("failed", "torchrun"), ("passed", "torchrun")]
    assert attempts[0]["error_kind"] == "transient" and attempts[1]["resumed_from"].endswith("checkpoint-2")
    assert assert_continued_from_checkpoint(Ledger(db_url), run_id, "sft") == 2
    assert_same_adapter(ddp_reference[2], adapter(Ledger(db_url).get_run(run_id)["run_dir"]))


def test_join_refuses_a_run_without_multi_node_stages_and_a_bad_node_rank(tmp_path, db_url):
    proc = cli("join", "no-such-run", "--node-rank", "1")
    assert proc.returncode == 2 and "no run with id 'no-such-run'" in proc.stderr, proc.stderr
    ledger = Ledger(db_url)
    config = load_config(QUICKSTART, overrides=_two_node_overrides(tmp_path))
    ledger.create_run(run_id="two-nodes", pipeline_id="quickstart", config_snapshot=config.model_dump(mode="json"),
                      output_dir=str(tmp_path), run_dir=str(tmp_path / "two-nodes"), config_path=str(QUICKSTART), stages=["sft"])
    proc = cli("join", "two-nodes", "--node-rank", "2")
    assert proc.returncode == 2 and "--node-rank 2 is outside 1..1" in proc.stderr, proc.stderr
    ledger.create_run(run_id="one-node", pipeline_id="quickstart",
                      config_snapshot=load_config(QUICKSTART).model_dump(mode="json"),
                      output_dir=str(tmp_path), run_dir=str(tmp_path / "one-node"), config_path=str(QUICKSTART), stages=["sft"])
    proc = cli("join", "one-node", "--node-rank", "1")
    assert proc.returncode == 2 and "no stage that spans several nodes" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.extended
def test_two_node_run_whose_orchestrator_is_killed_resumes_with_the_same_follower(tmp_path, db_url, ddp_reference):
    """Node 0's `trainpipe run` is SIGKILLed after checkpoint-4: every rank on both nodes stops, the
    follower stays, and `trainpipe resume` on node 0 brings both nodes back from checkpoint-4 to the
    uninterrupted adapter."""
    fault = {"stage": "sft", "step": 5, "action": "pause", "seconds": 120, "once_file": str(tmp_path / "fired")}
    with _two_nodes(tmp_path, db_url, fault) as (run_id, node0, node1, env):
        ledger = Ledger(db_url)
        wait_for(lambda: any(c["step"] == 4 for c in ledger.checkpoints(run_id, "sft")), what="checkpoint-4 recorded")
        work = Path(ledger.get_run(run_id)["run_dir"]) / ".work" / "sft"
        node0.send_signal(signal.SIGKILL)
        node0.wait(timeout=30)
        # Node 0's torchrun and rank die with it; node 1's rank loses its peer and its torchrun exits.
        wait_for(lambda: not _stage_processes(work), timeout=60, what="every rank on both nodes to stop")
        assert node1.poll() is None  # the follower waits for the run to be resumed

        resumed = cli("resume", run_id, env=env)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        out1, _ = node1.communicate(timeout=120)
    assert node1.returncode == 0 and f"run {run_id}: succeeded; served 2 attempt(s)" in out1, out1
    assert_resumed_to_reference(ledger, run_id, ["interrupted", "passed"], 4, ddp_reference[2])


@pytest.mark.slow
@pytest.mark.extended
def test_sigterm_on_node_0_stops_the_ranks_of_both_nodes_at_one_step(tmp_path, db_url, ddp_reference):
    """SIGTERM to node 0's `trainpipe run`: its torchrun forwards it to rank 0, and rank 1 on node 1
    learns of it through the per-step all-reduce; both save checkpoint-5 and exit. The follower waits,
    and serves the resumed attempt to the uninterrupted adapter."""
    fault = {"stage": "sft", "step": 5, "action": "pause", "seconds": 8, "once_file": str(tmp_path / "fired")}
    with _two_nodes(tmp_path, db_url, fault) as (run_id, node0, node1, env):
        wait_for(lambda: (tmp_path / "fired").exists(), what="SFT to reach step 5")
        node0.send_signal(signal.SIGTERM)
        assert node0.wait(timeout=120) == 130
        ledger = Ledger(db_url)
        assert ledger.get_run(run_id)["state"] == "interrupted"
        newest = max(ledger.checkpoints(run_id, "sft"), key=lambda c: c["step"])
        assert newest["step"] == 5 and checkpoints.verify(newest["path"], world_size=2) is None
        resumed = cli("resume", run_id, env=env)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        out1, _ = node1.communicate(timeout=120)
    # Node 1's torchrun may exit non-zero here even though its rank stopped cleanly: node 0's torchrun,
    # SIGTERMed, leaves without torchrun's exit barrier, which node 1's then reports as an error.
    assert node1.returncode == 0 and "served 2 attempt(s)" in out1, out1
    assert_resumed_to_reference(ledger, run_id, ["interrupted", "passed"], 5, ddp_reference[2])
