"""The options several `trainpipe` commands share, typed once (Typer's Annotated form)."""

from __future__ import annotations

from typing import Annotated

import typer

DbOption = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL of the ledger [env: TRAINPIPE_DB].",
                                               envvar="TRAINPIPE_DB", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a key, e.g. --set sft.learning_rate=1e-4")]
SftDatasetOption = Annotated[str | None, typer.Option(
    "--sft-dataset", help="SFT data: a file, folder or glob, or hub:ORG/NAME[:SPLIT] (overrides datasets.sft).")]
PreferenceDatasetOption = Annotated[str | None, typer.Option(
    "--preference-dataset", help="Preference data, as --sft-dataset (overrides datasets.preference).")]

RunIdOption = Annotated[str | None, typer.Option(
    "--run-id", help="Run under this id; if it exists, continue it (resume if interrupted, report if finished). "
                     "Inside a Slurm job the default is PIPELINE-slurm-JOBID, so a requeued job continues its run.",
    show_default=False)]
MaxRequeuesOption = Annotated[int | None, typer.Option(
    "--max-requeues", help="Inside a Slurm job: requeues the job asks for after the scheduler's warning "
                           "signal (USR2) before it leaves the run interrupted (env TRAINPIPE_MAX_REQUEUES, "
                           "default 5).", show_default=False)]
