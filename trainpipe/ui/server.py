"""Start-up of `trainpipe ui`: refuse an unsafe bind, open the ledger, bind the port, then serve.
Every refusal is a TrainpipeError (one message, exit 2) raised before anything is served."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable

from trainpipe.errors import LedgerError, TrainpipeError
from trainpipe.store.opening import open_for_reading
from trainpipe.store.reader import LEDGER_HINT, LedgerReader, default_db_url, sqlite_file

DEFAULT_PORT = 8420


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise TrainpipeError(f"refusing to serve the ledger on {host} without a token: anyone who reaches "
                             "that address could read every run",
                             hint="pass --token SECRET (or set TRAINPIPE_UI_TOKEN), or keep the default "
                                  "--host 127.0.0.1 and reach it through an SSH tunnel")


def open_ledger(url: str | None) -> LedgerReader:
    """The reader `status` uses. A SQLite path that does not exist is refused rather than created: the
    dashboard of an empty new file is almost always a mistyped --db."""
    url = url or default_db_url()
    file = sqlite_file(url)
    if file is not None and not file.exists():
        raise LedgerError(f"no ledger at {file}", hint=LEDGER_HINT)
    return open_for_reading(url)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TrainpipeError(f"port {port} on {host} is already in use",
                                 hint=f"pick another with --port (e.g. --port {port + 1})") from None
        raise TrainpipeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(db: str | None, host: str, port: int, token: str | None, announce: Callable[[str], None]) -> None:
    check_bind(host, token)
    try:
        import uvicorn

        from trainpipe.ui.app import create_app
    except ImportError as exc:
        raise TrainpipeError(f"`trainpipe ui` needs the web extra ({exc.name} is not installed)",
                             hint="pip install 'trainpipe[ui]'") from None
    ledger = open_ledger(db)
    sock = bind(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{sock.getsockname()[1]}/"
    # The token itself is never printed: a terminal's scrollback, a log file or a shared screen would keep it.
    needs = (f"; every request needs the token (--token or TRAINPIPE_UI_TOKEN): open {url}?token=YOUR_TOKEN "
             "once, or send Authorization: Bearer YOUR_TOKEN") if token else ""
    announce(f"trainpipe ui: serving {ledger.where} at {url} (read-only; Ctrl-C stops{needs})")
    app = create_app(ledger, token=token, db_label=ledger.where)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
