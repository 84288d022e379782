"""Reusing a stage from the cache: a stage's fingerprint, an earlier run's verified output with the same
one, and the lease that makes a run wait for another run training the same stage rather than train
it a second time at the same moment."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from trainpipe import faults
from trainpipe.config import STAGE_ORDER, PipelineConfig
from trainpipe.engine import cache, liveness
from trainpipe.engine.fingerprint import stage_fingerprint, upstream_stage
from trainpipe.engine.machine import advance
from trainpipe.engine.observer import Observer
from trainpipe.engine.stop import StopFlag
from trainpipe.paths import inside
from trainpipe.stages import OUTPUT_DIRS
from trainpipe.store.ledger import Ledger

# How often a run waiting for another run's training of the same stage looks again.
LEASE_POLL_S = float(os.environ.get("TRAINPIPE_LEASE_POLL_S", "1"))


def fingerprint_for(config: PipelineConfig, name: str, fingerprints: dict[str, str | None],
                 base_identity: dict[str, Any]) -> str | None:
    up = upstream_stage(config, name)
    if up is not None and fingerprints.get(up) is None:
        return None  # its input came from a stage run before this ledger had fingerprints: unknown
    return stage_fingerprint(config, name, fingerprints.get(up) if up else None, base_model=base_identity)


def reuse_cached(ledger: Ledger, run: dict[str, Any], config: PipelineConfig, stage_row: dict[str, Any],
                  fingerprint: str | None, observer: Observer, stop: StopFlag) -> str:
    """Record the stage's fingerprint; make the stage `cached` from an earlier run's verified output if
    the run's cache policy allows. Returns "cached" (nothing to train), "train", or "interrupted"
    (stopped while waiting for another run that is training the same stage).

    A run that trains a stage holds the lease on its fingerprint (released by `_drive` when the stage
    ends), so a run that needs the same stage meanwhile waits and then reuses it, rather than
    training it a second time at the same moment (concurrent runs, parallel sweep trials)."""
    run_id, name = run["run_id"], stage_row["name"]
    if stage_row["state"] != "pending":
        # Started in this run already (a resume): it continues from its own checkpoints, and keeps the
        # note on why it was trained. It takes back its lease unless another live run holds it (then
        # both train: the FSM has no way to turn a started stage into a cached one).
        ledger.set_stage_cache_info(run_id, name, fingerprint=fingerprint, cache_note=stage_row["cache_note"])
        if fingerprint:
            take_lease(ledger, run_id, name, fingerprint)
        return "train"
    policy = run.get("cache_policy") or {"use_cache": True, "from_stage": None}
    from_stage = policy.get("from_stage")
    note: str | None = None
    if fingerprint is None:
        note = f"not looked up: the {upstream_stage(config, name)} output it reads has no fingerprint"
    elif not policy.get("use_cache", True):
        note = "not looked up: cache disabled for this run (--no-cache)"
    elif from_stage and STAGE_ORDER.index(name) >= STAGE_ORDER.index(from_stage):
        note = f"not looked up: rerun requested from stage {from_stage} (--from-stage)"
    if note is not None:
        ledger.set_stage_cache_info(run_id, name, fingerprint=fingerprint, cache_note=note)
        if fingerprint:
            take_lease(ledger, run_id, name, fingerprint)  # others may wait for this output; we never wait
        return "train"
    assert fingerprint is not None
    waited_for: str | None = None
    while True:
        hit, problems = cache.find(ledger, run_id, name, fingerprint)
        if hit is not None:
            break
        holder = take_lease(ledger, run_id, name, fingerprint)
        if holder is None:
            break  # ours to train
        if waited_for != holder["run_id"]:
            waited_for = holder["run_id"]
            observer.note(f"{name}: run {waited_for} is training the same {name} (same fingerprint); "
                          "waiting to reuse its output")
        if stop.requested:
            return "interrupted"
        ledger.heartbeat(run_id)
        time.sleep(LEASE_POLL_S)
    note = "not reused: " + "; ".join(problems) if hit is None and problems else None
    ledger.set_stage_cache_info(run_id, name, fingerprint=fingerprint, cache_note=note)
    if hit is None:
        if note:
            observer.note(f"{name}: an earlier output was {note}; training it again")
        return "train"
    source = hit.candidate
    run_dir = run["run_dir"]
    output_dir = inside(run_dir, OUTPUT_DIRS[name])
    how = cache.link_into(Path(source["output_path"]), hit.files, output_dir)
    metrics, origin = cache.origin_metrics(ledger, source["run_id"], name, run_dir)
    ledger.reuse_stage(run_id, name, advance("stage", "reuse_cached"), source_run=source["run_id"],
                       output_path=str(output_dir),
                       files=[(str(output_dir / rel), size, digest) for rel, size, digest in hit.files],
                       final_model_path=metrics.get("final_model_path"),
                       detail={"fingerprint": fingerprint, "source_run": source["run_id"], "trained_in": origin,
                               "source_path": source["output_path"], "files": len(hit.files), "linked_by": how,
                               "waited_for": waited_for})
    faults.orchestrator_point(f"{name}:cached")
    observer.stage_finished(name, "cached", metrics, None, None)
    trained = "" if origin == source["run_id"] else f", trained in {origin}"
    observer.note(f"{name}: reused from run {source['run_id']}{trained} (same fingerprint, files verified; "
                  "gate result carried over)")
    return "cached"


def take_lease(ledger: Ledger, run_id: str, name: str, fingerprint: str) -> dict[str, Any] | None:
    """Take the stage lease (None), or the row of the live run that holds it. A lease whose run is no
    longer running, or whose owner is gone, is taken over."""
    holder = ledger.acquire_stage_lease(fingerprint, name, run_id)
    if holder is None:
        return None
    other = ledger.find_run(holder["run_id"])
    if other is None or other["state"] != "running" or liveness.owner_gone(other, time.time()):
        return ledger.acquire_stage_lease(fingerprint, name, run_id, replace_run=holder["run_id"])
    return holder
