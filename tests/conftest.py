"""Every test gets its own ledger, home and output dirs under tmp; no test touches the user's home.
The built-in tiny model is built once per session into a shared cache (deterministic, ~20 s)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"
PLUGINS = Path(__file__).resolve().parent / "plugins"
TASK_API = REPO_ROOT / "examples" / "task_api"
PG_URL_ENV = "TRAINPIPE_TEST_PG_URL"
LESSON_CONFIGS = ("pipeline_config.yaml", "sft_config.yaml", "dpo_config.yaml")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, model_cache, monkeypatch) -> Path:
    home = tmp_path / "tp-home"
    monkeypatch.setenv("TRAINPIPE_HOME", str(home))
    monkeypatch.setenv("TRAINPIPE_DB", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("TRAINPIPE_CACHE", str(model_cache))
    monkeypatch.setenv("TRAINPIPE_RETRY_BACKOFF_S", "0")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # Custom checks live in tests/plugins, importable here and in stage processes.
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])))
    # A developer's shell may export these; tests must not depend on them.
    monkeypatch.delenv("TRAINPIPE_FAULT", raising=False)
    monkeypatch.delenv("TRAINPIPE_STALE_AFTER_S", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return home


@pytest.fixture
def db_url(request, tmp_path, monkeypatch) -> str:
    """The test's ledger: a SQLite file, or with `indirect` param "postgresql" a fresh PostgreSQL
    database (see pg_url), which TRAINPIPE_DB then names too, for the CLI and the engine."""
    if getattr(request, "param", "sqlite") == "postgresql":
        url = request.getfixturevalue("pg_url")
        monkeypatch.setenv("TRAINPIPE_DB", url)
        return url
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The server in TRAINPIPE_TEST_PG_URL (`.ci/start-postgres` starts one and prints it). Without
    one the PostgreSQL tests skip, saying why; under CI=true they fail instead: CI must run them."""
    url = os.environ.get(PG_URL_ENV)
    reason = None
    if not url:
        reason = f"no PostgreSQL server: set {PG_URL_ENV} (`.ci/start-postgres` starts one and prints the URL)"
    else:
        from sqlalchemy import create_engine
        from sqlalchemy.exc import SQLAlchemyError

        engine = create_engine(url, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except SQLAlchemyError as exc:
            reason = f"PostgreSQL server {PG_URL_ENV}={url} is not reachable: {str(exc).splitlines()[0]}"
        finally:
            engine.dispose()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the PostgreSQL tests must run, not skip)")
        pytest.skip(reason)
    return url


@pytest.fixture
def pg_url(pg_server: str):
    """A fresh database on the test server, dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, make_url

    name = f"tp_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        yield make_url(pg_server).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            # FORCE: a SIGKILLed run's connections may linger until the server notices.
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        admin.dispose()


@pytest.fixture
def lesson_dir(tmp_path, monkeypatch) -> Path:
    """The lesson's layout: ./configs/{pipeline,sft,dpo}_config.yaml, run from the parent dir. The files
    are the lesson-format ones this repository ships (the lesson's keys and values, with a comment on
    each knob), so a clone of the repository alone runs the tests."""
    root = tmp_path / "lesson"
    (root / "configs").mkdir(parents=True)
    for name in LESSON_CONFIGS:
        # Without the comments, as the lesson writes them: tests edit the files line by line.
        text = (REPO_ROOT / "configs" / name).read_text(encoding="utf-8")
        lines = [re.sub(r"\s+#.*$", "", line) for line in text.splitlines() if not line.lstrip().startswith("#")]
        (root / "configs" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(TASK_API / "sft.jsonl", root / "sft.jsonl")
    shutil.copy(TASK_API / "preference.jsonl", root / "preference.jsonl")
    monkeypatch.chdir(root)
    return root


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def fast_overrides(output_dir: Path) -> list[str]:
    """Quickstart, shortened for tests: fewer steps, same code path."""
    return [f"output_dir={output_dir}", "sft.max_steps=12", "dpo.max_steps=6", "checkpoint_every_n_steps=4",
            "validation.max_loss=6.5",
            # 12 SFT steps cannot teach the request -> action mapping, nor move a loss that starts at ~0.27
            # (the base already writes the JSON format) beyond its noise: both checks still run and report,
            # as warnings. The quickstart test and tests/test_gates.py enforce them at error.
            "validation.checks.output_format_valid.severity=warn", "validation.checks.loss_went_down.severity=warn",
            "validation.max_new_tokens=32"]


def resume_overrides(output_dir: Path) -> list[str]:
    """Short, with several checkpoints per stage: SFT 12 steps, DPO 6 steps, a checkpoint every 2."""
    return fast_overrides(output_dir) + ["checkpoint_every_n_steps=2", "sft.max_steps=12", "dpo.max_steps=6"]


def uninterrupted_run(tmp_path_factory, model_cache, name: str, overrides) -> Path:
    """The quickstart with `overrides(output_dir)`, run once in-process with a ledger and home of its
    own and no fault: the run dir of a reference that interrupted runs must end on."""
    import trainpipe

    out = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRAINPIPE_DB", f"sqlite:///{out / 'ledger.db'}")
        env.setenv("TRAINPIPE_CACHE", str(model_cache))
        env.setenv("TRAINPIPE_HOME", str(out / "home"))
        env.delenv("TRAINPIPE_FAULT", raising=False)
        result = trainpipe.run(QUICKSTART, overrides=overrides(out / "artifacts"))
    assert result.state == "succeeded", result.errors
    return Path(result.run_dir)


@pytest.fixture(scope="session")
def reference_weights(tmp_path_factory, model_cache):
    """One uninterrupted run; every interrupted scenario must land on exactly these weights."""
    from helpers import final_weights

    return final_weights(uninterrupted_run(tmp_path_factory, model_cache, "reference", resume_overrides))


def pytest_collection_modifyitems(config, items) -> None:
    """`extended` tests (more scenarios of a property that `make test` already shows once) keep CI
    under its time budget; `make matrix` runs them with TRAINPIPE_FULL_MATRIX=1."""
    if os.environ.get("TRAINPIPE_FULL_MATRIX") == "1":
        return
    skip = pytest.mark.skip(reason="extended scenario: `make matrix` (TRAINPIPE_FULL_MATRIX=1) runs it")
    for item in items:
        if item.get_closest_marker("extended"):
            item.add_marker(skip)


@pytest.fixture
def small_fs(tmp_path):
    """A mount point and a function that (re)mounts a tmpfs of the given size there (test_disk_full.py,
    test_disk_estimate.py). Mounting needs root: without it the test skips, saying why; under CI=true
    it fails instead."""
    mount_point = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        options = f"remount,size={size}" if mounted else f"size={size}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            reason = f"cannot mount a tmpfs here ({(proc.stderr or proc.stdout).strip()}); needs root"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{reason} (CI=true: the full-disk tests must run, not skip)")
            pytest.skip(reason)
        mounted.append(size)
        return mount_point

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.fixture
def trainpipe(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """The console script's own `main()`, in this process: a subprocess costs ~1 s of imports, and
    mocks (the Hub's, tests/test_disk_estimate.py) hold only here. Returns a CompletedProcess-like
    result, so the same assertions serve both."""
    from trainpipe.cli.app import main

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["trainpipe", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(["trainpipe", *args], code, captured.out, captured.err)

    return call


@pytest.fixture(scope="session")
def slurm_cluster() -> Path:
    """The one-host Slurm cluster `.ci/start-slurm` started (SLURM_CONF names its slurm.conf). Without
    one the Slurm tests skip, saying why; under CI=true they fail instead: CI must run them."""
    conf = os.environ.get("SLURM_CONF")
    reason = None
    if not conf or not Path(conf).is_file():
        reason = "no Slurm cluster: `eval \"$(.ci/start-slurm --env)\"` starts one and sets SLURM_CONF"
    elif shutil.which("sinfo") is None:
        reason = "sinfo is not on PATH (Debian's slurm-wlm; .ci/start-slurm installs it)"
    else:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0 or not proc.stdout.strip():
            reason = f"the Slurm cluster at {conf} does not answer: {(proc.stderr or proc.stdout).strip()}"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the Slurm tests must run, not skip)")
        pytest.skip(reason)
    return Path(conf)
