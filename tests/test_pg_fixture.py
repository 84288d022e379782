"""The PostgreSQL tests skip, saying why, where no server is reachable, and fail instead under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci, outcome", [("", "1 skipped"), ("true", "1 error")])
def test_postgresql_tests_without_a_server(ci: str, outcome: str) -> None:
    env = {**os.environ, "TRAINPIPE_TEST_PG_URL": "postgresql+psycopg://trainpipe@127.0.0.1:1/postgres", "CI": ci}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider",
                           str(TESTS / "test_ledger.py"), "-k", "test_migrations_rerun_safely"],
                          capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=300)
    out = proc.stdout + proc.stderr
    assert "1 passed" in out and outcome in out, out  # the SQLite variant still runs
    assert "PostgreSQL server TRAINPIPE_TEST_PG_URL=postgresql+psycopg://trainpipe@127.0.0.1:1/postgres is not " \
           "reachable" in out, out
    assert proc.returncode == (1 if ci else 0), out
    if ci:
        assert "CI=true: the PostgreSQL tests must run, not skip" in out, out
