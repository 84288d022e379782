"""The Python API for scripts; the CLI calls the same two functions.

    import trainpipe
    result = trainpipe.run("configs/quickstart.yaml", overrides=["sft.learning_rate=1e-4"])
    print(result.state, result.final_model_path)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainpipe.engine.observer import Observer, RunResult
    from trainpipe.store.ledger import Ledger


def _ledger(db: str | None, ledger: Ledger | None) -> Ledger:
    from trainpipe.store.ledger import Ledger

    return ledger or Ledger(db)


def run(config: str | os.PathLike[str], *, overrides: list[str] | None = None, sft_dataset: str | None = None,
        preference_dataset: str | None = None, db: str | None = None, ledger: Ledger | None = None,
        observer: Observer | None = None, use_cache: bool = True, from_stage: str | None = None,
        force: bool = False, run_id: str | None = None, max_requeues: int | None = None) -> RunResult:
    """Validate the config and datasets, then run the pipeline. Raises TrainpipeError on bad input.

    A stage whose fingerprint matches one that passed in an earlier run reuses that output unless
    `use_cache` is false; `from_stage` retrains that stage and every later one. `force` starts even
    when the output filesystem looks too small for what the run will write.

    With `run_id` (and by default inside a Slurm job, whose id names the run) the same call made again
    continues that run: it resumes an interrupted one and reports a finished one (engine/rerun.py).
    `max_requeues`: how often a Slurm job requeues itself after the scheduler's warning (default 5)."""
    from trainpipe.engine import driver, rerun, scheduler

    if run_id is None and scheduler.current_job() is None:
        return driver.start(str(config), ledger=_ledger(db, ledger), overrides=overrides, sft_dataset=sft_dataset,
                            preference_dataset=preference_dataset, observer=observer, use_cache=use_cache,
                            from_stage=from_stage, force=force)
    return rerun.run(str(config), ledger=_ledger(db, ledger), run_id=run_id, overrides=overrides,
                     sft_dataset=sft_dataset, preference_dataset=preference_dataset, observer=observer,
                     use_cache=use_cache, from_stage=from_stage, force=force, max_requeues=max_requeues)


def data_preview(config: str | os.PathLike[str], *, overrides: list[str] | None = None,
                 sft_dataset: str | None = None, preference_dataset: str | None = None) -> list[dict]:
    """What each stage of the config would train on: source, format, rows, and the first example's
    tokens with the ones that carry loss marked. Checks every row; writes nothing."""
    from trainpipe.config import load_config
    from trainpipe.stages.preview import preview

    return preview(load_config(config, overrides=overrides, sft_dataset=sft_dataset,
                               preference_dataset=preference_dataset))


def resume(run_id: str, *, db: str | None = None, ledger: Ledger | None = None,
           observer: Observer | None = None, force: bool = False) -> RunResult:
    """Continue an interrupted or failed run from its first stage that has not passed. A change of
    environment that breaks resuming (see docs/outputs.md, "Lineage") is refused unless `force`."""
    from trainpipe.engine import driver

    return driver.resume(run_id, ledger=_ledger(db, ledger), observer=observer, force=force)
