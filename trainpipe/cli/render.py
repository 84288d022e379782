"""All terminal output. Only cli/ imports rich. One Renderer with a human and a JSON mode."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trainpipe import humanize
from trainpipe.cli.render_cluster import job_status_line, scheduler_jobs, submission

if TYPE_CHECKING:
    from trainpipe.engine.observer import RunResult

STATE_STYLE = {"succeeded": "green", "passed": "green", "running": "cyan", "validating": "cyan",
               "interrupted": "yellow", "failed": "red", "rejected": "magenta", "skipped": "dim",
               "cancelled": "dim", "pending": "dim", "cached": "green"}


PLAIN_TABLE_ROWS = 200
KIND_LABEL = {"user": "input error", "transient": "transient error", "environment": "disk full", "bug": "bug"}  # trainpipe/failures.py


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 48) -> str:
    """The curve in one line of block characters, resampled to at most `width` of them."""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))] for v in values)


def _state(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


def _first_line(text: str | None, width: int = 200) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _source(stage: dict[str, Any]) -> str:
    """Trained here, or reused from where (inspect and the run summary)."""
    if stage.get("name") == "upload":
        return "pushes the final model to the Hub (never taken from the cache)"
    if stage.get("source") == "cached":
        origin = stage["cached_from"]
        trained = origin.get("trained_in")
        where = f"run {origin['run_id']} (stage {origin['stage']})"
        if trained and trained != origin["run_id"]:
            where += f", trained in run {trained}"
        return f"reused from {where}: nothing trained"
    if stage.get("source") == "trained":
        return "trained in this run"
    return "not run"


class Renderer:
    def __init__(self, json_mode: bool = False):
        self.json_mode = json_mode
        # Piped output has no terminal width to respect; rich's 80-column default truncates ids.
        self.out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
        self.err = Console(stderr=True, highlight=False)

    def print_json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")

    def data_preview(self, previews: list[dict[str, Any]]) -> None:
        """`trainpipe data`: loss-carrying tokens in bold green (and between ⟦ ⟧, which survives a pipe),
        the rest dim; tokens past max_length struck through."""
        if self.json_mode:
            self.print_json(previews)
            return
        for item in previews:
            self.out.print(f"[bold]{escape(item['role'])}[/]: {escape(item['source'])}")
            self.out.print(f"  format {item['format']}, {item['rows']:,} rows (checked in {item['check_seconds']:.2f} s), "
                           f"loss: {escape(item['loss'])}, max_length {item['max_length']}")
            for part, pieces in item["example"].items():
                self.out.print(f"  first example, {part}: {item['tokens'][part]} tokens, "
                               f"{item['loss_tokens'][part]} carry loss")
                text, in_loss = "", False
                for piece in pieces:
                    if piece["loss"] != in_loss:
                        text += "[bold green]⟦" if piece["loss"] else "⟧[/][dim]"
                        in_loss = piece["loss"]
                    token = escape(piece["token"])
                    text += f"[strike]{token}[/strike]" if piece["truncated"] else token
                text = "[dim]" + text + ("⟧[/]" if in_loss else "[/]")
                self.out.print("    " + text.replace("\n", "\n    "), soft_wrap=True)

    def error(self, message: str, hint: str | None = None) -> None:
        # Messages quote user input (dataset text, --set values): never let it be read as markup.
        self.err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        if hint:
            self.err.print(f"[dim]hint: {escape(hint)}[/]", soft_wrap=True)

    # ---------------------------------------------------------------- status

    def status(self, rows: list[dict[str, Any]]) -> None:
        if self.json_mode:
            return self.print_json(rows)
        if not rows:
            self.out.print("No runs yet. Start one with: trainpipe run CONFIG  (or: trainpipe demo)")
            return
        headers = ("run id", "pipeline", "state", "stage", "progress", "started", "duration")
        cells = [(row["run_id"], row["pipeline_id"], row["state"], row["current_stage"] or "-",
                  f"{row['stages_done']}/{row['stages_total']}", humanize.when(row["started_at"]),
                  humanize.duration(row["duration_s"])) for row in rows]
        if len(cells) > PLAIN_TABLE_ROWS:
            self._plain_table(headers, cells)
        else:
            table = Table(title="trainpipe runs")
            for column in headers:
                # The run id is what users copy into `resume`; never truncate it.
                table.add_column(column, no_wrap=column in ("run id", "started"), min_width=len(column))
            for cell in cells:
                table.add_row(*cell[:2], _state(cell[2]), *cell[3:])
            self.out.print(table)
        for row in rows:
            run_id = row["run_id"]
            job_line = job_status_line(row)
            if job_line:
                self.out.print(job_line, soft_wrap=True)
            elif row["state"] == "interrupted":
                self.out.print(f"[yellow]{run_id}[/] is interrupted: resume with [bold]trainpipe resume {run_id}[/]",
                               soft_wrap=True)
            elif row["state"] == "failed":
                kind = row.get("error_kind")
                label = f" ({KIND_LABEL.get(kind, kind)})" if kind else ""
                reason = escape(_first_line(row.get("error")) or "no reason recorded")
                if kind == "bug":
                    advice = f"the traceback is in [bold]trainpipe inspect {run_id}[/]"
                elif row["current_stage"] is None:
                    advice = "no stage ran: fix it and start a new run with [bold]trainpipe run[/]"
                elif kind == "user":
                    advice = f"fix it, then [bold]trainpipe resume {run_id}[/]"
                else:
                    advice = f"resume with [bold]trainpipe resume {run_id}[/]"
                self.out.print(f"[red]{run_id}[/] failed{label}: {reason}; {advice}", soft_wrap=True)

    def submission(self, done: Any) -> None:
        submission(self, done)

    def _plain_table(self, headers: tuple[str, ...], cells: list[tuple[str, ...]]) -> None:
        # rich measures every cell of every row; at 10,000 runs that alone takes ~15 s.
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(cell, widths)).rstrip() for cell in cells]
        sys.stdout.write("\n".join(lines) + "\n")

    # ---------------------------------------------------------------- inspect

    def verification(self, report: dict[str, Any]) -> None:
        if self.json_mode:
            return self.print_json(report)
        for entry in report["artifacts"]:
            if entry["status"] != "ok":
                self.out.print(f"[red]{entry['status']}[/] {escape(entry['path'])} ({entry['stage']}): "
                               f"{escape(entry['detail'])}", soft_wrap=True)
        if not report["checked"]:
            self.out.print(f"Run {report['run_id']} ({report['state']}) recorded no artifacts: nothing to verify.")
        elif report["ok"]:
            self.out.print(f"[green]ok[/]: all {report['checked']} artifacts of {report['run_id']} match the ledger")
        else:
            self.out.print(f"[red]{report['changed']} changed, {report['missing']} missing[/] of "
                           f"{report['checked']} artifacts of {report['run_id']}")

    def diagrams(self, diagrams: dict[str, str]) -> None:
        if self.json_mode:
            return self.print_json(diagrams)
        for kind, text in diagrams.items():
            self.out.print(f"%% {kind} states (paste into any Mermaid renderer)", markup=False)
            self.out.print(text, markup=False)

    def inspect(self, report: dict[str, Any]) -> None:
        if self.json_mode:
            return self.print_json(report)
        import yaml

        self.out.print(f"[bold]Run {report['run_id']}[/]  {_state(report['state'])}  pipeline {report['pipeline_id']}")
        self.out.print(f"run dir: {report['run_dir']}")
        self.out.print(f"final model: {report['final_model_path'] or '-'}")
        if report["error"]:
            kind = f" ({report['error_kind']})" if report.get("error_kind") else ""
            self.out.print(f"[red]error{kind}:[/] {escape(report['error'])}", soft_wrap=True)
        if report.get("traceback"):
            self.out.rule("traceback (a bug in trainpipe: please report it)")
            self.out.print(report["traceback"].rstrip(), markup=False, soft_wrap=True)
        self.out.rule("config snapshot")
        # libyaml's emitter where PyYAML has it: the pure-Python one is a tenth of inspect's time.
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        self.out.print(yaml.dump(report["config"], Dumper=dumper, sort_keys=False).rstrip(), markup=False)
        if report.get("scheduler_jobs"):
            scheduler_jobs(self.out, report)
        if report.get("lineage") is not None:
            self._lineage(report["run_id"], report["lineage"])
        for stage in report["stages"]:
            self.out.rule(f"stage {stage['name']}")
            self.out.print(f"state {_state(stage['state'])}, attempts {stage['attempts']}, "
                           f"output {stage['output_path'] or '-'}")
            self.out.print(f"  {_source(stage)}", markup=False, soft_wrap=True)
            if stage.get("cache_note"):
                self.out.print(f"  cache: {stage['cache_note']}", markup=False, soft_wrap=True)
            if stage.get("fingerprint"):
                self.out.print(f"  fingerprint: {stage['fingerprint']}", markup=False)
            for attempt in stage["attempt_history"]:
                extra = f", resumed from {attempt['resumed_from']}" if attempt["resumed_from"] else ""
                extra += f", overrides {attempt['overrides']}" if attempt["overrides"] else ""
                kind = f" ({attempt['error_kind']})" if attempt.get("error_kind") else ""
                extra += f", error{kind}: {attempt['error']}" if attempt["error"] else ""
                worker = f" ({attempt['worker']})" if attempt.get("worker") else ""
                self.out.print(f"  attempt {attempt['attempt']}{worker}: {attempt['outcome']} in "
                               f"{attempt['duration_s']:.1f} s{extra}", markup=False, soft_wrap=True)
                for role, data in (attempt.get("data") or {}).items():
                    load = f"loaded in {data['load_seconds']:.2f} s, " if data.get("load_seconds") is not None else ""
                    self.out.print(f"    data {role}: {data.get('rows')} rows, {load}tokenized data "
                                   f"{data.get('action', '?')} in {data.get('seconds', 0):.2f} s"
                                   + (f" (cache rebuilt: {data['rebuilt_because']})" if data.get("rebuilt_because")
                                      else ""), markup=False, soft_wrap=True)
                if attempt.get("traceback"):
                    self.out.print("    " + attempt["traceback"].rstrip().replace("\n", "\n    "), markup=False,
                                   soft_wrap=True)
            metrics = {k: v for k, v in stage["metrics"].items() if not isinstance(v, (dict, list))}
            if metrics:
                self.out.print("  metrics: " + ", ".join(f"{k}={humanize.short(v)}" for k, v in metrics.items()),
                               markup=False)
            if stage["checkpoints"]:
                self.out.print("  checkpoints: " + ", ".join(f"step {c['step']}" for c in stage["checkpoints"]))
            for passed_over in stage.get("skipped_checkpoints") or []:
                self.out.print(f"  checkpoint passed over: {passed_over}", markup=False, soft_wrap=True)
            for name, points in stage.get("curves", {}).items():
                values = [v for _, v in points]
                self.out.print(f"  {name:<18} {sparkline(values)}  {humanize.short(values[0])} -> {humanize.short(values[-1])} "
                               f"over {len(values)} logged steps", markup=False)
            if stage["gate"]:
                self._gate_table(stage["gate"]["name"], stage["gate"]["checks"], stage["gate"]["passed"],
                                 carried_from=stage["gate"].get("carried_from"))
        self.out.rule("transitions")
        table = Table()
        for column in ("#", "time", "stage", "from", "to", "trigger", "pid"):
            table.add_column(column)
        for t in report["transitions"]:
            table.add_row(str(t["id"]), humanize.when(t["at"]), t["stage"] or "(run)", t["from_state"] or "-",
                          t["to_state"], t["trigger"], str(t["pid"]))
        self.out.print(table)

    def _lineage(self, run_id: str, lineage: dict[str, Any]) -> None:
        self.out.rule("lineage")
        lines = []
        if not lineage.get("recorded"):
            lines.append("not recorded: the run was created before trainpipe recorded lineage")
        else:
            base = lineage.get("base_model") or {}
            ident = ", ".join(f"{k} {str(v)[:12] if k != 'hub' else v}" for k, v in base.items()
                              if k not in ("name", "builtin") and v is not None) or "no revision cached"
            lines.append(f"config sha256 {str(lineage.get('config_sha256'))[:12]}  seed {lineage.get('seed')}")
            lines.append(f"base model {base.get('name')} ({ident})")
            for role, data in (lineage.get("datasets") or {}).items():
                # Runs recorded before issue 18 have `path`; later ones `source` and a sha256 or a Hub revision.
                origin = data.get("source") or data.get("path")
                content = (f"revision {str(data.get('revision'))[:12]}" if data.get("hub")
                           else f"sha256 {str(data.get('sha256'))[:12]}")
                fmt = f" ({data['format']})" if data.get("format") not in (None, "auto") else ""
                lines.append(f"dataset {role}: {origin}{fmt} {content}")
            libs = lineage.get("libraries") or {}
            lines.append("libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v))
            missing = [k for k, v in libs.items() if not v]
            if missing:
                lines.append("  not installed: " + ", ".join(missing))
            device = lineage.get("device") or {}
            gpu = f" ({device['gpu']})" if device.get("gpu") else ""
            sizes = ", ".join(f"{k} {v}" for k, v in (lineage.get("world_size") or {}).items())
            lines.append(f"device {device.get('type')}{gpu}, cpu kernel {lineage.get('cpu_kernel') or 'default'}, "
                         f"world size: {sizes or '-'}")
        by_stage: dict[str, list[int]] = {}
        for artifact in lineage.get("artifacts") or []:
            by_stage.setdefault(artifact["stage"], []).append(int(artifact["size_bytes"] or 0))
        if by_stage:
            lines.append("artifacts: " + ", ".join(f"{stage} {len(sizes)} files {sum(sizes) / 1e6:.2f} MB"
                                                   for stage, sizes in by_stage.items())
                         + f" (sha256 of each in --json; `trainpipe verify {run_id}` re-hashes them)")
        for line in lines:
            self.out.print(line, markup=False, soft_wrap=True)

    def _gate_table(self, name: str, checks: list[dict[str, Any]], passed: bool, only_failed: bool = False,
                    carried_from: str | None = None) -> None:
        carried = f" (carried over from run {carried_from}, not re-run)" if carried_from else ""
        table = Table(title=f"gate {name}: {'passed' if passed else 'REJECTED'}{carried}")
        for column in ("check", "result", "value", "threshold", "time", "details"):
            table.add_column(column)
        for check in checks:
            if only_failed and check["passed"]:
                continue
            result = "[green]pass[/]" if check["passed"] else (
                "[yellow]warn[/]" if check.get("severity") == "warn" else "[red]FAIL[/]")
            table.add_row(check["name"], result, humanize.short(check["value"]), humanize.short(check["threshold"]),
                          f"{check.get('duration_s') or 0:.2f}s", check.get("details") or "")
        self.out.print(table)

    # ---------------------------------------------------------------- run

    def run_summary(self, result: RunResult, report: dict[str, Any]) -> None:
        if self.json_mode:
            return self.print_json({"run_id": result.run_id, "state": result.state, "exit_code": result.exit_code,
                                    "final_model_path": result.final_model_path, "errors": result.errors,
                                    "error_kind": result.error_kind})
        table = Table(title=f"run {result.run_id}: {result.state}")
        for column in ("stage", "state", "attempts", "time", "result", "gate"):
            table.add_column(column)
        for stage in report["stages"]:
            metrics = stage["metrics"]
            key = ("size_gb" if stage["name"] == "merge" else "final_loss")
            value = f"{key}={humanize.short(metrics.get(key))}" if key in metrics else "-"
            took = sum(a["duration_s"] for a in stage["attempt_history"])
            gate = stage["gate"]
            verdict = "-" if gate is None else ("passed" if gate["passed"] else "[red]rejected[/]")
            if gate is not None and gate.get("carried_from"):
                verdict += " (carried over)"
            table.add_row(stage["name"], _state(stage["state"]), str(stage["attempts"]),
                          f"{took:.1f}s" if stage["attempts"] else "-", value, verdict)
        self.out.print(table)
        for stage in report["stages"]:
            if stage["state"] == "cached":
                self.out.print(f"{stage['name']}: {_source(stage)}", markup=False, soft_wrap=True)
            if stage["name"] == "upload" and stage["state"] == "passed":
                self.out.print(f"uploaded to {stage['metrics'].get('repo_id')}: {stage['metrics'].get('commit_url')}",
                               markup=False, soft_wrap=True)
        if result.rejected_gate is not None:
            gate = result.rejected_gate
            self._gate_table(gate.gate, gate.as_rows(), False, only_failed=True)
            self.out.print("Fix the cause above (or adjust the thresholds under `validation:`) and start a new run.")
        kind = f" ({result.error_kind})" if result.error_kind else ""
        for error in result.errors:
            self.out.print(f"[red]error{kind}:[/] {escape(error)}", soft_wrap=True)
        if result.state == "succeeded":
            self.out.print(f"[green]final model:[/] {result.final_model_path}", soft_wrap=True)
        elif result.state == "failed" and result.error_kind == "user":
            self.out.print("The input is at fault, so it was not retried. Fix it, then: "
                           f"[bold]trainpipe resume {result.run_id}[/] (a fix in the config needs a new "
                           "`trainpipe run`: a run keeps the config it started with)", soft_wrap=True)
        elif result.state == "failed" and result.error_kind == "bug":
            self.out.print(f"Not retried: this looks like a bug; the traceback is in "
                           f"[bold]trainpipe inspect {result.run_id}[/]. Resume with: "
                           f"[bold]trainpipe resume {result.run_id}[/]", soft_wrap=True)
        elif result.error_kind == "environment":
            self.out.print("The disk is full (an environment error): nothing was lost. Free space there "
                           "(or move output_dir to a larger disk), then: "
                           f"[bold]trainpipe resume {result.run_id}[/]", soft_wrap=True)
        elif result.requeued_job:
            self.out.print(f"The scheduler requeued job {result.requeued_job}: it runs the same command again "
                           "and continues this run (`trainpipe status` shows it waiting in the queue)", soft_wrap=True)
        elif result.state in ("interrupted", "failed"):
            self.out.print(f"resume with: [bold]trainpipe resume {result.run_id}[/]", soft_wrap=True)


    # ---------------------------------------------------------------- sweep

    def sweep(self, report: dict[str, Any]) -> None:
        if self.json_mode:
            return self.print_json(report)
        objective = report["objective"]
        table = Table(title=f"sweep {report['sweep_id']}: {report['state']} ({report['strategy']}, "
                            f"{objective['direction']} {objective['metric']})")
        table.add_column("trial", no_wrap=True)
        for key in report["space"]:
            table.add_column(key)
        for stage in ("sft", "merge", "dpo"):
            table.add_column(f"gate {stage}")
        for column in ("trained", objective["metric"], "wall", "run"):
            table.add_column(column, no_wrap=column == "run")
        for row in report["trials"]:
            label = f"[bold green]{row['number']} ★ best[/]" if row["best"] else str(row["number"])
            gates = [_state(state) if state != "-" else "-" for state in row["gates"].values()]
            table.add_row(label, *[escape(humanize.short(row["params"].get(k))) for k in report["space"]], *gates,
                          ",".join(row["trained"]) or "-", humanize.short(row["objective"]),
                          humanize.duration(row["wall_s"]) if row["wall_s"] is not None else "-", row["run_id"])
        self.out.print(table)
        trained = report["stage_trainings"]
        naive = report["naive_stage_trainings"]
        self.out.print("stage trainings: " + ", ".join(f"{s} {trained[s]}" for s in trained if naive[s])
                       + f" (without the cache: {', '.join(f'{s} {naive[s]}' for s in naive if naive[s])})")
        best = report["best"]
        if best:
            self.out.print(f"[green]best:[/] trial {best['number']} (run {best['run_id']}), "
                           f"{objective['metric']} = {humanize.short(best['objective'])}", soft_wrap=True)
            if report["outputs"]["best_config"] and report["state"] == "finished":
                self.out.print(f"best config: {report['outputs']['best_config']}", soft_wrap=True)
        elif report["state"] == "finished":
            self.out.print("[red]no trial passed every gate[/]; a rejected trial is never chosen")
        if report["state"] == "finished":
            self.out.print(f"table: {report['outputs']['table']}", soft_wrap=True)
        elif report["state"] == "interrupted":
            self.out.print(f"resume with: [bold]trainpipe sweep --resume {report['sweep_id']}[/]", soft_wrap=True)
