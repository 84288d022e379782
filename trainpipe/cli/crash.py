"""The CLI's last resort: an exception nobody expected (a bug) or a full disk, as one screen on
stderr and an exit code, never a traceback on the terminal."""

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
