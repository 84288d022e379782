"""Live progress of a run in the terminal. Apart from render.py because it needs the engine's
Observer, and `status`/`inspect` must not import the engine's run driver (it pulls in SQLAlchemy)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from trainpipe import humanize
from trainpipe.cli.render import Renderer, _state
from trainpipe.engine.observer import Observer
from trainpipe.engine.sweep import SweepObserver


class StageTimeColumn(ProgressColumn):
    """The time left while a stage runs; once it ended (passed, failed, interrupted), how long it took."""

    def __init__(self) -> None:
        super().__init__()
        self._remaining = TimeRemainingColumn()

    def render(self, task: Task) -> Text:
        if task.stop_time is None:
            return self._remaining.render(task)
        seconds = int(task.elapsed or 0)
        return Text(f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}", style="progress.elapsed")


class ProgressObserver(Observer):
    """Live progress bars per stage: step/total, loss, ETA."""

    def __init__(self, renderer: Renderer):
        self.renderer = renderer
        self.console = renderer.err if renderer.json_mode else renderer.out
        self._new_bars()
        self.started = False
        self.run_id: str | None = None

    def _new_bars(self) -> None:
        self.progress = Progress(TextColumn("{task.description:<6}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss]}"), StageTimeColumn(),
                                 console=self.console, transient=False)
        self.tasks: dict[str, Any] = {}

    def run_created(self, run_id: str, run_dir: str) -> None:
        self.run_id = run_id
        if self.renderer.json_mode:
            self.console.print(f"run id: {run_id}")
        else:
            self.renderer.out.print(f"Run [bold]{run_id}[/]")
            self.renderer.out.print(f"[dim]run dir: {run_dir}[/]")

    def _ensure_started(self) -> None:
        if not self.started:
            self.progress.start()
            self.started = True

    def stage_started(self, stage: str, attempt: int, resumed_from: str | None) -> None:
        self._ensure_started()
        label = stage if attempt == 1 else f"{stage} #{attempt}"
        self.tasks[stage] = self.progress.add_task(label, total=None, loss="")
        if resumed_from:
            self.progress.console.print(f"{stage}: resuming from {resumed_from}")

    def stage_progress(self, stage: str, step: int, total: int, logs: dict[str, Any] | None) -> None:
        task = self.tasks.get(stage)
        if task is None:
            return
        fields: dict[str, Any] = {}
        if logs and "loss" in logs:
            fields["loss"] = f"loss {logs['loss']:.4f}"
        self.progress.update(task, completed=step, total=total or None, **fields)

    def stage_finished(self, stage: str, state: str, metrics: dict[str, Any], gate: Any, error: str | None) -> None:
        task = self.tasks.get(stage)
        if task is not None:
            if state in ("passed", "rejected"):  # trained to its end (a rejection is the gate's verdict after)
                total = self.progress.tasks[task].total
                self.progress.update(task, completed=total or 1, total=total or 1)
            # A failed or interrupted stage keeps the step it reached: never a full bar.
            self.progress.update(task, description=f"{stage} {state}")
            self.progress.stop_task(task)
        elif state == "skipped":
            self._ensure_started()
            self.progress.console.print(f"{stage}: skipped (disabled)")
        elif state == "cached":
            self._ensure_started()
            self.progress.console.print(f"{stage}: [green]cached[/]")
        if error:
            self.progress.console.print(f"[red]{stage}: {escape(error)}[/]", soft_wrap=True)

    def data_phase(self, role: str, phase: str, rows: int, seconds: float | None) -> None:
        """Load, check and tokenize are phases of their own: a line with rows/s when one ends, and
        a live row count while a long one runs (so the stage's bar is not stuck at 0 meanwhile).
        The row checks run before the run exists: their lines go to stderr, since scripts read the
        run id from stdout's first line."""
        if self.run_id is None:
            if seconds is not None and seconds >= 1:  # a small dataset's check is not worth a line
                rate = f", {rows / seconds:,.0f} rows/s" if seconds > 0 else ""
                self.renderer.err.print(f"[dim]{escape(role)}: {phase}: {rows:,} rows in {seconds:.2f} s{rate}[/]")
            elif rows and rows % 250_000 == 0:
                self.renderer.err.print(f"[dim]{escape(role)}: {phase}: {rows:,} rows so far[/]")
            return
        self._ensure_started()
        label = f"{role} {phase.split()[0]}"
        task = self.tasks.get(label)
        if seconds is None:
            if task is None:
                self.tasks[label] = self.progress.add_task(label, total=None, loss="")
            elif rows:
                self.progress.update(task, completed=rows)
            return
        if task is not None:
            # Hidden, not removed: rich indexes `progress.tasks` by position, and the stage bars use it.
            self.progress.update(task, visible=False)
            del self.tasks[label]
        rate = f", {rows / seconds:,.0f} rows/s" if seconds > 0 and rows else ""
        self.progress.console.print(f"[dim]{escape(role)}: {escape(phase)}: {rows:,} rows in {seconds:.2f} s{rate}[/]")

    def note(self, text: str) -> None:
        self._ensure_started()
        self.progress.console.print(f"[yellow]{escape(text)}[/]", soft_wrap=True)

    def close(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False


class SweepProgress(ProgressObserver, SweepObserver):
    """Each trial's runs as usual, under a line naming the trial and its parameters."""

    def sweep_created(self, sweep_id: str, total: int) -> None:
        if self.renderer.json_mode:
            self.console.print(f"sweep id: {sweep_id}")
        else:
            self.renderer.out.print(f"Sweep [bold]{sweep_id}[/] ({total} trials)")

    def trial_started(self, number: int, total: int, params: dict[str, Any], run_id: str, resumed: bool) -> None:
        self.close()
        self._new_bars()  # a fresh set of bars per trial
        shown = ", ".join(f"{k}={humanize.short(v)}" for k, v in params.items())
        self.console.rule(f"trial {number + 1}/{total}{' (resumed)' if resumed else ''}: {escape(shown)}")

    def trial_finished(self, number: int, state: str, objective: float | None) -> None:
        self.close()
        self.console.print(f"trial {number + 1}: {_state(state)}, objective {humanize.short(objective)}")
