"""The `trainpipe` command. Commands are thin: parse, call the engine, render."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from trainpipe.cli.options import (
    DbOption,
    JsonOption,
    MaxRequeuesOption,
    PreferenceDatasetOption,
    RunIdOption,
    SetOption,
    SftDatasetOption,
)
from trainpipe.errors import EXIT_STAGE_FAILED, TrainpipeError

# Markdown, not rich markup: help texts quote extras, splits and env vars in brackets ('trainpipe[ui]',
# hub:ORG/NAME[:SPLIT]), which rich markup would take for style tags and drop.
app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="Reproducible, resumable SFT -> merge -> DPO pipelines with validation gates.")


@app.callback(invoke_without_command=True)
def _options(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print trainpipe's version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="With --version: also the libraries, the device and "
                                          "the CPU kernel, as a run's lineage records them.")] = False,
) -> None:
    if version:
        from trainpipe.cli.crash import version_lines

        for line in version_lines(verbose):
            print(line)
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)

# What the last-resort handler in main() can tell about the run it was driving.
_session: dict[str, str | None] = {"run_id": None}


def _ledger(db: str | None):
    from trainpipe.store.ledger import Ledger

    return Ledger(db)


def _reader(db: str | None):
    from trainpipe.store.opening import open_for_reading

    return open_for_reading(db)


def _renderer(json_mode: bool = False):
    from trainpipe.cli.render import Renderer

    return Renderer(json_mode)


def _drive(call, renderer, db: str | None, after=None) -> None:
    """Run `call(ledger, observer)` with live progress, then print the summary and exit with its code."""
    from trainpipe.cli.progress import ProgressObserver
    from trainpipe.engine.report import run_report

    from trainpipe.store.opening import LedgerOnFirstUse

    ledger = LedgerOnFirstUse(db)  # a refused run leaves no ledger file behind
    observer = ProgressObserver(renderer)
    try:
        result = call(ledger, observer)
    finally:
        observer.close()
        _session["run_id"] = observer.run_id
    renderer.run_summary(result, run_report(ledger, result.run_id))
    if after is not None:
        after(result)
    raise typer.Exit(result.exit_code)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML (the lesson's pipeline_config.yaml format).")],
    set_: SetOption = None,
    sft_dataset: SftDatasetOption = None,
    preference_dataset: PreferenceDatasetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the data and show what each stage would train "
                                          "on (as `trainpipe data`); start no run.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Train every stage; reuse no earlier output.")] = False,
    from_stage: Annotated[str | None, typer.Option("--from-stage", help="Train this stage and every later one; "
                                                   "earlier ones may come from the cache.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start even if the output filesystem has less free "
                                        "space than the run is estimated to write.")] = False,
    run_id: RunIdOption = None,
    max_requeues: MaxRequeuesOption = None,
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """Start a run, or continue it: the same command run again under the same --run-id resumes an
    interrupted run and reports a finished one. Exit codes: 0 ok, 1 stage failed, 2 bad input (also:
    the run is owned by a live process, or exists with another config), 3 gate rejected, 75 disk full
    (free space, then resume), 130 interrupted.

    A stage whose fingerprint (settings, inputs, versions) matches a stage that passed in an earlier
    run, and whose files still verify, is reused (`cached`) instead of trained."""
    from trainpipe import api

    if dry_run:
        data(config, set_, sft_dataset, preference_dataset, json_output)
        return
    _drive(lambda ledger, observer: api.run(config, ledger=ledger, overrides=set_ or [], sft_dataset=sft_dataset,
                                            preference_dataset=preference_dataset, observer=observer,
                                            use_cache=not no_cache, from_stage=from_stage, force=force,
                                            run_id=run_id, max_requeues=max_requeues),
           _renderer(json_output), db)


@app.command()
def data(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML.")],
    set_: SetOption = None,
    sft_dataset: SftDatasetOption = None,
    preference_dataset: PreferenceDatasetOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show what each stage would train on: per dataset the source, detected format and row count,
    and the first example through the chat template with the tokens that carry loss marked. Checks
    every row like `run`; writes nothing, trains nothing."""
    from trainpipe import api

    previews = api.data_preview(config, overrides=set_ or [], sft_dataset=sft_dataset,
                                preference_dataset=preference_dataset)
    _renderer(json_output).data_preview(previews)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="The run to continue (see `trainpipe status`).")],
    force: Annotated[bool, typer.Option("--force", help="Resume even though the environment changed in a way "
                                        "that breaks resuming (world size, a major library version, "
                                        "cpu<->cuda; the differences are recorded), or the output "
                                        "filesystem looks too small for the stages left.")] = False,
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """Continue an interrupted or failed run from the first stage that has not passed.

    The environment is compared with the run's lineage first: a breaking difference exits 2 and
    records nothing, unless --force."""
    from trainpipe import api

    _drive(lambda ledger, observer: api.resume(run_id, ledger=ledger, observer=observer, force=force),
           _renderer(json_output), db)


@app.command()
def status(
    show_all: Annotated[bool, typer.Option("--all", help="Every run, not only the 20 most recent.")] = False,
    json_output: JsonOption = False,
    db: DbOption = None,
) -> None:
    """List runs. A run whose owner process is gone shows as interrupted."""
    from trainpipe.engine.report import status_rows

    renderer, rows = _renderer(json_output), status_rows(_reader(db), show_all=show_all)
    renderer.status(rows)
    if not rows and db is None:
        from trainpipe.cli.next_steps import demo_ledger_hint

        demo_ledger_hint(renderer)


@app.command()
def inspect(
    run_id: Annotated[str | None, typer.Argument(help="Run id.", show_default=False)] = None,
    graph: Annotated[bool, typer.Option("--graph", help="Print the run and stage state machines as Mermaid "
                                                        "diagrams (from the transition table itself).")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw loss curves and DPO reward margins "
                                                            "into FILE.png (needs matplotlib).",
                                              metavar="FILE.png", show_default=False)] = None,
    json_output: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Everything the ledger holds about one run: config, stages, attempts, gates, transitions."""
    if graph:
        from trainpipe.engine.machine import mermaid

        _renderer(json_output).diagrams({kind: mermaid(kind) for kind in ("run", "stage")})
        return
    if run_id is None:
        raise typer.BadParameter("give a RUN_ID (see `trainpipe status`), or --graph", param_hint="RUN_ID")
    from trainpipe.engine.report import run_report

    report = run_report(_reader(db), run_id)
    if plot is not None:
        from trainpipe.cli.plots import plot_run

        plot_run(report, plot)
    _renderer(json_output).inspect(report)
    if plot is not None and not json_output:
        _renderer().out.print(f"plot written to {plot}", markup=False)


@app.command()
def verify(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    json_output: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Re-hash every artifact the run recorded; exit 1 if any changed or vanished."""
    from trainpipe.engine.verify import verify_run

    report = verify_run(_reader(db), run_id)
    _renderer(json_output).verification(report)
    raise typer.Exit(0 if report["ok"] else EXIT_STAGE_FAILED)


@app.command()
def sweep(
    sweep_file: Annotated[Path | None, typer.Argument(help="Sweep YAML (e.g. configs/sweep_beta.yaml).",
                                                      show_default=False)] = None,
    resume_id: Annotated[str | None, typer.Option("--resume", help="Continue this sweep: finished trials are "
                                                  "kept, an interrupted one resumes, the rest start.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key in every trial, e.g. "
                                                   "--set output_dir=/tmp/out")] = None,
    parallel: Annotated[int, typer.Option("--parallel", help="Trials at once (grid and random): this process "
                                          "plus N-1 `--worker` processes.")] = 1,
    worker_id: Annotated[str | None, typer.Option("--worker", help="Join this sweep as an extra worker (any "
                                                  "machine that reaches the ledger through --db).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start even if the output filesystem has less free "
                                        "space than the sweep's trials are estimated to write (its "
                                        "trials start so too).")] = False,
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """Run a sweep: trials over a space of stage settings, sharing unchanged stages through the cache.
    Exit codes: 0 a best trial was found, 1/3 no trial passed every gate, 2 bad input, 130 interrupted."""
    from trainpipe.cli.progress import SweepProgress
    from trainpipe.engine import sweep as sweeps

    if sum(x is not None for x in (sweep_file, resume_id, worker_id)) != 1:
        raise TrainpipeError("give one of: a sweep file, --resume SWEEP_ID, --worker SWEEP_ID",
                             hint="trainpipe sweep configs/sweep_beta.yaml")
    if sweep_file is None and set_:
        raise TrainpipeError("--set cannot change an existing sweep: its trials keep the settings they "
                             "started with")
    if sweep_file is None and force:
        raise TrainpipeError("--force applies to the process that starts a sweep; an existing sweep keeps "
                             "the --force it started with")
    if worker_id is not None and parallel != 1:
        raise TrainpipeError("--parallel applies to the process that starts or resumes a sweep; start more "
                             "--worker processes instead")
    renderer = _renderer(json_output)
    ledger = _ledger(db)
    observer = SweepProgress(renderer)
    try:
        if worker_id is not None:
            result = sweeps.work(worker_id, ledger=ledger, observer=observer)
        elif resume_id is not None:
            result = sweeps.resume(resume_id, ledger=ledger, observer=observer, parallel=parallel)
        else:
            result = sweeps.start(str(sweep_file), ledger=ledger, extra_sets=set_ or [], observer=observer,
                                  parallel=parallel, force=force)
    finally:
        observer.close()
    renderer.sweep(result.report)
    raise typer.Exit(result.exit_code)


@app.command()
def join(
    run_id: Annotated[str, typer.Argument(help="The run node 0 started (its first line of output).")],
    node_rank: Annotated[int, typer.Option("--node-rank", help="This node's rank, 1..nnodes-1 (node 0 runs "
                                           "`trainpipe run` or `resume`).")],
    exit_when_interrupted: Annotated[bool, typer.Option("--exit-when-interrupted", help="Leave when the run is "
                                                        "interrupted instead of waiting for its resume.")] = False,
    db: DbOption = None,
) -> None:
    """Serve a multi-node run's torchrun stages from this node until the run finishes. The ledger
    (--db) and the run dir must be reachable from every node; this node records nothing."""
    from trainpipe.engine.follower import follow

    renderer = _renderer()
    result = follow(_reader(db), run_id, node_rank, note=lambda line: renderer.out.print(line, markup=False),
                    exit_when_interrupted=exit_when_interrupted)
    renderer.out.print(f"run {run_id}: {result.run_state}; served {len(result.attempts)} attempt(s)", markup=False)


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML.")],
    slurm: Annotated[bool, typer.Option("--slurm", help="Submit to Slurm with sbatch (the scheduler trainpipe "
                                        "submits to).")] = False,
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes for the job (one task each).")] = 1,
    gpus_per_node: Annotated[int | None, typer.Option("--gpus-per-node", help="GPUs per node.",
                                                      show_default=False)] = None,
    time_limit: Annotated[str | None, typer.Option("--time", help="The job's time limit, HH:MM:SS (sbatch --time).",
                                                   show_default=False)] = None,
    partition: Annotated[str | None, typer.Option("--partition", help="Slurm partition.", show_default=False)] = None,
    account: Annotated[str | None, typer.Option("--account", help="Slurm account.", show_default=False)] = None,
    max_requeues: MaxRequeuesOption = None,
    grace: Annotated[int, typer.Option("--grace", help="Seconds of warning (USR2) Slurm gives before the time "
                                       "limit or a preemption: the stage checkpoints and the job requeues.")] = 300,
    set_: SetOption = None,
    sft_dataset: SftDatasetOption = None,
    preference_dataset: PreferenceDatasetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the batch script; write and submit nothing.")]
    = False,
    force: Annotated[bool, typer.Option("--force", help="Submit even with an SQLite ledger on a network file "
                                        "system (NFS, Lustre, GPFS).")] = False,
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """Write a batch script for the run into its directory and submit it: the job runs `trainpipe run
    CONFIG --run-id ID`, checkpoints and requeues itself on Slurm's warning before a time limit or a
    preemption, and the requeued job continues the run. Prints the job id and the run id."""
    from trainpipe.engine.submit import SlurmRequest
    from trainpipe.engine.submit import submit as submit_job

    if not slurm:
        raise TrainpipeError("give --slurm: Slurm is the scheduler trainpipe submits to",
                             hint="elsewhere (Kubernetes, SkyPilot) run `trainpipe run CONFIG --run-id ID` as the "
                                  "job's command (docs/clusters.md)")
    renderer = _renderer(json_output)
    request = SlurmRequest(nodes=nodes, gpus_per_node=gpus_per_node, time=time_limit, partition=partition,
                           account=account, max_requeues=max_requeues, grace_s=grace)
    done = submit_job(str(config), request=request, overrides=set_ or [], sft_dataset=sft_dataset,
                      preference_dataset=preference_dataset, db_url=db, dry_run=dry_run, force=force,
                      note=lambda line: renderer.err.print(line, markup=False))
    renderer.submission(done)


@app.command("sweep-status")
def sweep_status(
    sweep_id: Annotated[str, typer.Argument(help="Sweep id (printed when the sweep starts).")],
    json_output: JsonOption = False,
    db: DbOption = None,
) -> None:
    """The comparison table of a sweep, from the ledger: params, gates, objective, wall time, the best."""
    from trainpipe.engine.sweep_report import report

    _renderer(json_output).sweep(report(_ledger(db), sweep_id))


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes its artifacts.")] = Path("trainpipe-demo"),
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """Run configs/quickstart.yaml on the built-in tiny model (CPU, a minute or two)."""
    from trainpipe import api
    from trainpipe.paths import bundled_path

    quickstart = bundled_path("configs/quickstart.yaml")
    workdir = workdir.resolve()
    db = db or os.environ.get("TRAINPIPE_DB") or f"sqlite:///{workdir / 'ledger.db'}"
    from trainpipe.cli.next_steps import after_demo

    renderer = _renderer(json_output)
    _drive(lambda ledger, observer: api.run(quickstart, ledger=ledger, observer=observer,
                                            overrides=[f"output_dir={workdir / 'artifacts'}"]),
           renderer, db, after=lambda result: after_demo(renderer, db, result.run_id))


@app.command()
def ui(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but loopback needs --token.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free one).")] = 8420,
    token: Annotated[str | None, typer.Option("--token", help="Secret every request must carry (?token=, then a "
                                              "cookie) [env: TRAINPIPE_UI_TOKEN].", envvar="TRAINPIPE_UI_TOKEN",
                                              show_default=False)] = None,
    db: DbOption = None,
) -> None:
    """A read-only web dashboard over the ledger: runs, one run, compare, sweeps, state machines.
    Needs the `ui` extra: pip install 'trainpipe[ui]'."""
    from trainpipe.ui.server import serve

    serve(db, host, port, token, announce=lambda line: print(line, flush=True))


def main() -> None:
    from trainpipe.cli.crash import run_guarded

    run_guarded(app, lambda: _renderer(), lambda: _session["run_id"])


if __name__ == "__main__":
    main()
