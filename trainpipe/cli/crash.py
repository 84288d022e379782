"""What the CLI says outside its commands: `--version`, and its last resort, an exception nobody
expected (a bug) or a full disk, as one screen on stderr and an exit code, never a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from trainpipe.errors import EXIT_STAGE_FAILED


def crash_report(exc: BaseException, run_id: str | None) -> int:
    """Last resort for an exception nobody expected (a bug): one screen on stderr, the whole traceback
    in a log file. Plain writes, no rich: this must work whatever else is broken."""
    import tempfile
    import time
    import traceback

    from trainpipe.paths import home_dir

    text = (f"trainpipe {' '.join(sys.argv[1:])}\nrun: {run_id or '-'}\n"
            f"python {sys.version.split()[0]}\n\n" + "".join(traceback.format_exception(exc)))
    log_path = None
    for folder in (home_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            candidate = folder / f"trainpipe-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            candidate.write_text(text, encoding="utf-8")
            log_path = candidate
            break
        except OSError:
            continue
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    lines = [f"error: unexpected {type(exc).__name__}: {first}"]
    if run_id:
        lines.append(f"run: {run_id} (`trainpipe inspect {run_id}` shows what the ledger "
                     "recorded)")
    lines.append(f"full traceback: {log_path}" if log_path else "the traceback could not be written to a log file")
    lines.append("This is a bug in trainpipe, not in your input: please report it with that file.")
    sys.stderr.write("\n".join(lines) + "\n")
    return EXIT_STAGE_FAILED


def disk_report(failure, run_id: str | None) -> int:
    from trainpipe.diskspace import full_disk_message
    from trainpipe.errors import EXIT_ENVIRONMENT

    message = full_disk_message(failure.where or ".", failure.reason or "no space left on device", run_id=run_id)
    if not run_id:
        message += "; free space there and run the command again"
    sys.stderr.write(f"error: {message}\n")
    return EXIT_ENVIRONMENT


class ReaderGone(BaseException):
    """stdout's reader closed the pipe. A BaseException, so that neither Click (which exits 1 on
    EPIPE) nor a command's `except Exception` turns it into an error."""


class ReaderAwareStdout:
    """sys.stdout, whose writes raise ReaderGone once the reader has gone away (EPIPE)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise ReaderGone() from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise ReaderGone() from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def version_lines(verbose: bool) -> list[str]:
    """`trainpipe --version [--verbose]`: trainpipe's version; verbose, the facts a run's lineage
    records (engine/lineage.py): library versions, the device, and the CPU kernel torch runs."""
    from trainpipe.engine.identity import cuda_device_visible, gpu_name
    from trainpipe.engine.lineage import LIBRARIES
    from trainpipe.versions import package_versions

    versions = package_versions(LIBRARIES)
    lines = [f"trainpipe {versions.pop('trainpipe') or 'unknown'}"]
    if not verbose:
        return lines
    import platform

    lines.append(f"python {platform.python_version()}")
    lines += [f"{name} {version or 'not installed'}" for name, version in versions.items()]
    if cuda_device_visible():
        lines.append(f"device cuda ({gpu_name() or 'unknown GPU'})")
    else:
        lines.append("device cpu")
    try:
        import torch

        kernel = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        kernel = "unknown"
    chosen = os.environ.get("ATEN_CPU_CAPABILITY")
    lines.append(f"cpu kernel {kernel}" + (f" (ATEN_CPU_CAPABILITY={chosen})" if chosen else ""))
    return lines


def run_guarded(app, renderer, run_id) -> None:
    """The `trainpipe` entry point around the Typer app. Click's standalone mode handles usage errors
    (exit 2) and typer.Exit; our own errors become one message and their exit code, and anything
    else one screen and exit 1: never a traceback. `renderer()` and `run_id()` are asked only when
    needed (the run the last-resort message names)."""
    from trainpipe.errors import EXIT_INTERRUPTED, TrainpipeError

    stdout = sys.stdout
    sys.stdout = ReaderAwareStdout(stdout)
    try:
        try:
            app()
        finally:
            try:
                sys.stdout.flush()  # inside the try: a reader that left is noticed here, not at exit
            finally:
                sys.stdout = stdout
    except ReaderGone:
        # The reader went away (`trainpipe data CONFIG | head -3`): end quietly, as `git log | head`
        # does. Click would exit 1; stdout now goes to /dev/null so that no later flush fails again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
        sys.exit(0)
    except TrainpipeError as exc:
        renderer().error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - the last resort; the traceback goes to a file
        from trainpipe.failures import ENVIRONMENT, classify

        failure = classify(exc)
        if failure.kind == ENVIRONMENT:
            # A full disk is not a bug, wherever it surfaced: one message, no crash log (there may be
            # no room for one anyway).
            sys.exit(disk_report(failure, run_id()))
        sys.exit(crash_report(exc, run_id()))
