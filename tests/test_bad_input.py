"""Every bad input on every path: one clear message, the right exit code, nothing recorded that is not
real (issue 11). User-visible behaviour goes through the real CLI in a subprocess, on real SQLite
files; "ledger unchanged" compares the ledger's rows (or its bytes, where it must not be touched at
all) before and after. Only two tests start a stage process, and none trains."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import QUICKSTART, REPO_ROOT, TASK_API, fast_overrides
from helpers import cli

from trainpipe import failures
from trainpipe.config import ineffective_overrides, load_config
from trainpipe.engine import preflight
from trainpipe.stages.data import load_rows, validate_jsonl
from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.timeout(180)

LESSON_MODEL = "unsloth/Qwen2.5-3B-Instruct-bnb-4bit"


@pytest.fixture(autouse=True)
def no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache and a Hub that refuses connections at once (nothing listens on port 9), so
    no test depends on the network or on the developer's cache."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return cache


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """The ledger conftest points TRAINPIPE_DB at, created, so that "unchanged" has something to compare."""
    Ledger().close()
    return tmp_path / "ledger.db"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(path: Path) -> dict[str, list[str]]:
    """Every row of every table, read without writing (mode=ro)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: sorted(repr(r) for r in conn.execute(f"SELECT * FROM {t}")) for t in tables}
    finally:
        conn.close()


def assert_clean(proc: subprocess.CompletedProcess, code: int, *messages: str) -> None:
    """The exit code, each message on stderr, and no traceback anywhere."""
    shown = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == code, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    for message in messages:
        assert message in proc.stderr, f"{message!r} not on stderr\n{shown}"


def sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


@contextmanager
def read_only(path: Path):
    """chmod a-w; as root (which ignores modes) also a read-only bind mount of the path onto itself, so
    writes fail with EROFS whatever the filesystem (`chattr +i` is refused on overlayfs and tmpfs).
    Where mounting is not permitted the test skips, saying why; under CI=true it fails instead."""
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    mounted = False
    try:
        if os.geteuid() == 0:
            for step in (["mount", "--bind", str(path), str(path)],
                         ["mount", "-o", "remount,ro,bind", str(path)]):
                done = subprocess.run(step, capture_output=True, text=True)
                if done.returncode != 0:
                    reason = f"running as root and `{' '.join(step)}` failed, nothing is read-only: {done.stderr.strip()}"
                    if os.environ.get("CI") == "true":
                        pytest.fail(f"{reason} (CI=true: this test must run, not skip)")
                    pytest.skip(reason)
                mounted = True
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)
        path.chmod(mode)


# ------------------------------------------------------------------ the ledger


@pytest.mark.parametrize("where", ["/proc/nope/ledger.db", "{tmp}/a-file/ledger.db"])
def test_ledger_in_a_directory_that_cannot_exist(where: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory\n")
    path = Path(where.format(tmp=tmp_path))
    if not path.parent.parent.is_dir():
        pytest.skip(f"{path.parent.parent} does not exist here")

    proc = cli("status", "--db", f"sqlite:///{path}")

    assert_clean(proc, 2, f"error: ledger {path}: ", "--db")
    assert not path.parent.is_dir()


def test_ledger_that_is_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    before = sha256(junk)

    for args in (["status"], ["inspect", "some-run"], ["run", str(QUICKSTART)]):
        proc = cli(*args, "--db", f"sqlite:///{junk}")
        assert_clean(proc, 2, f"error: ledger {junk} is not an SQLite database")

    assert sha256(junk) == before


def test_sqlite_file_that_is_not_a_ledger_is_left_alone(tmp_path: Path) -> None:
    other = tmp_path / "app.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    before = sha256(other)

    proc = cli("status", "--db", f"sqlite:///{other}")

    assert_clean(proc, 2, f"ledger {other} is a database but not a trainpipe ledger (tables: users")
    assert sha256(other) == before


# A newer trainpipe's Alembic revision; or a pre-Alembic step name (0.1.0 recorded those).
@pytest.mark.parametrize("statement", [
    "UPDATE alembic_version SET version_num = '0099_from_the_future'",
    "INSERT INTO schema_migrations (name, applied_at) VALUES ('0099_from_the_future', 0)"])
def test_ledger_from_a_newer_trainpipe(statement: str, ledger_path: Path) -> None:
    conn = sqlite3.connect(ledger_path)
    conn.execute(statement)
    conn.commit()
    conn.close()
    before = rows(ledger_path)

    for args in (["status"], ["run", str(QUICKSTART)]):
        proc = cli(*args)
        assert_clean(proc, 2, "was created by a newer trainpipe", "0099_from_the_future", "upgrade trainpipe")

    assert rows(ledger_path) == before


def test_unreachable_postgresql_ledger(tmp_path: Path) -> None:
    url = "postgresql+psycopg://trainpipe@127.0.0.1:1/ledger"  # port 1: refused at once, no server needed
    for args in (["status"], ["run", str(QUICKSTART), *sets(f"output_dir={tmp_path / 'out'}")]):
        proc = cli(*args, "--db", url)
        assert_clean(proc, 2, f"error: ledger {url}: connection failed", "Connection refused")
    assert not (tmp_path / "out").exists()


def test_read_only_ledger_refuses_a_run_but_can_be_read(ledger_path: Path, tmp_path: Path) -> None:
    before = rows(ledger_path)
    with read_only(ledger_path):
        proc = cli("run", str(QUICKSTART), *sets(f"output_dir={tmp_path / 'out'}"))
        assert_clean(proc, 2, f"error: ledger {ledger_path} is read-only")
        status = cli("status")
    assert status.returncode == 0 and "No runs yet" in status.stdout, status.stderr
    assert rows(ledger_path) == before
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the output dir


def test_output_dir_under_a_file(ledger_path: Path, tmp_path: Path) -> None:
    """The issue's `--set output_dir=/etc/hostname/sub`, with a file of our own."""
    a_file = tmp_path / "hostname"
    a_file.write_text("box\n")
    before = rows(ledger_path)

    proc = cli("run", str(QUICKSTART), *sets(f"output_dir={a_file}/sub"))

    assert_clean(proc, 2, f"error: output_dir '{a_file}/sub': {a_file} is a file, not a directory",
                 "nothing was recorded")
    assert rows(ledger_path) == before
    status = cli("status")
    assert "No runs yet" in status.stdout and "interrupted" not in status.stdout


def test_output_dir_not_writable(ledger_path: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    before = rows(ledger_path)
    with read_only(locked):
        proc = cli("run", str(QUICKSTART), *sets(f"output_dir={locked}/artifacts"))
    assert_clean(proc, 2, f"output_dir '{locked}/artifacts': cannot write in {locked}")
    assert rows(ledger_path) == before
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------ the base model


def test_lesson_config_with_an_unreachable_hub_fails_fast(lesson_dir: Path, ledger_path: Path) -> None:
    """The lesson's own config: 2 min 51 s and 3 attempts before; now one message, before any write."""
    assert LESSON_MODEL in (REPO_ROOT / "configs" / "pipeline_config.yaml").read_text()
    before = rows(ledger_path)

    proc = cli("run", "configs/pipeline_config.yaml", "--sft-dataset", "sft.jsonl",
               "--preference-dataset", "preference.jsonl", timeout=60)

    assert_clean(proc, 2, f"error: base_model '{LESSON_MODEL}': not in the local cache",
                 "the Hub is unreachable", "point base_model at a local directory")
    assert rows(ledger_path) == before
    assert not (lesson_dir / "artifacts").exists()


def test_lesson_config_offline_says_how_to_go_online(lesson_dir: Path, ledger_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = rows(ledger_path)

    proc = cli("run", "configs/pipeline_config.yaml", "--sft-dataset", "sft.jsonl",
               "--preference-dataset", "preference.jsonl", timeout=60)

    assert_clean(proc, 2, f"base_model '{LESSON_MODEL}': not in the local cache", "HF_HUB_OFFLINE=1",
                 "set HF_HUB_OFFLINE=0", "point base_model at a local directory")
    assert rows(ledger_path) == before


def tiny_model_files(folder: Path, *, weights: bool = True) -> Path:
    """A directory that looks like a model: config, tokenizer and (optionally) weights. Preflight
    looks at files only, so the weights can be any bytes."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 1024,
                                                    "hidden_size": 48, "intermediate_size": 96,
                                                    "num_hidden_layers": 2, "num_attention_heads": 4,
                                                    "num_key_value_heads": 2}))
    (folder / "tokenizer_config.json").write_text("{}")
    if weights:
        (folder / "model.safetensors").write_bytes(os.urandom(2048))
    return folder


def test_model_directory_without_weights(ledger_path: Path, tmp_path: Path) -> None:
    model = tiny_model_files(tmp_path / "my-model", weights=False)
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    before = rows(ledger_path)

    proc = cli("run", str(QUICKSTART), *sets(f"output_dir={tmp_path / 'out'}", f"base_model={model}"))

    assert_clean(proc, 2, f"base_model '{model}': {model} has only PyTorch pickle weights", "safetensors only")
    assert rows(ledger_path) == before
    assert not (tmp_path / "out").exists()


def test_local_model_problems_are_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    no_weights = tiny_model_files(tmp_path / "no-weights", weights=False)
    assert "no such directory" in preflight.base_model_problem(str(tmp_path / "missing"))
    assert "no config.json" in preflight.base_model_problem(str(empty))
    assert "is a LoRA adapter, not a full model" in preflight.base_model_problem(str(adapter))
    assert f"no weights in {no_weights} (expected *.safetensors)" in preflight.base_model_problem(str(no_weights))
    assert preflight.base_model_problem(str(tiny_model_files(tmp_path / "ok"))) is None
    assert "unknown built-in model" in preflight.base_model_problem("builtin:huge")


def fake_hub_cache(cache: Path, repo_id: str, *, weights: bool) -> None:
    """The layout huggingface_hub writes: refs/main names a snapshot holding the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    tiny_model_files(repo / "snapshots" / ("0" * 40), weights=weights)


def test_hub_model_in_the_local_cache_needs_no_network(no_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(no_hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub_cache(no_hub, "org/cached", weights=True)
    fake_hub_cache(no_hub, "org/partial", weights=False)

    assert preflight.base_model_problem("org/cached") is None
    assert "not in the local cache" in preflight.base_model_problem("org/partial")
    assert "HF_HUB_OFFLINE=1" in preflight.base_model_problem("org/absent")


def test_upload_needs_a_repo_id_and_a_token(ledger_path: Path, tmp_path: Path) -> None:
    before = rows(ledger_path)
    proc = cli("run", str(QUICKSTART), *sets(f"output_dir={tmp_path / 'out'}", "upload_to_hub=true",
                                             "hub_repo_id=me/task-model"))
    assert_clean(proc, 2, "upload_to_hub: uploading to 'me/task-model' needs a Hub token", "HF_TOKEN")
    assert rows(ledger_path) == before
    config = load_config(QUICKSTART, overrides=["upload_to_hub=true", "hub_repo_id=no-namespace"])
    assert "like 'your-name/model-name'" in preflight.upload_problem(config)


def test_every_preflight_problem_is_listed(ledger_path: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("x")
    before = rows(ledger_path)
    proc = cli("run", str(QUICKSTART), *sets(f"output_dir={a_file}/out", f"base_model={tmp_path / 'nope'}"))
    assert_clean(proc, 2, "2 problems stop this run:", f"output_dir '{a_file}/out'",
                 f"base_model '{tmp_path / 'nope'}': no such directory")
    assert rows(ledger_path) == before


# ------------------------------------------------------------------ failures inside a stage


def run_report(run_id: str) -> dict:
    return json.loads(cli("inspect", run_id, "--json", check=True).stdout)


def test_unloadable_weights_fail_as_user_error_without_retry(ledger_path: Path, tmp_path: Path) -> None:
    """Preflight sees files; the stage finds they are not safetensors. Exit 2, one attempt, not three."""
    model = tiny_model_files(tmp_path / "corrupt")
    proc = cli("run", str(QUICKSTART), "--json", *sets(*fast_overrides(tmp_path / "out"), f"base_model={model}",
                                                       "stages.sft.retry_count=2", "stages.merge.enabled=false",
                                                       "stages.dpo.enabled=false"))
    assert_clean(proc, 2)
    result = json.loads(proc.stdout)
    assert (result["state"], result["error_kind"]) == ("failed", "user")
    report = run_report(result["run_id"])
    assert report["error_kind"] == "user"
    [sft] = [s for s in report["stages"] if s["name"] == "sft"]
    [attempt] = sft["attempt_history"]
    assert attempt["error_kind"] == "user" and f"base_model={model}" in attempt["error"], attempt
    assert attempt["traceback"] is None  # kept for bugs only; the stage log has it


def test_stage_bug_is_not_retried_and_its_traceback_is_kept(ledger_path: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINPIPE_FAULT", json.dumps({"stage": "sft", "at": "start", "action": "crash"}))
    proc = cli("run", str(QUICKSTART), "--json", *sets(f"output_dir={tmp_path / 'out'}", "stages.sft.retry_count=2"))
    assert_clean(proc, 1)
    report = run_report(json.loads(proc.stdout)["run_id"])
    [sft] = [s for s in report["stages"] if s["name"] == "sft"]
    [attempt] = sft["attempt_history"]
    assert attempt["error_kind"] == "bug" and "injected crash" in attempt["error"]
    assert "Traceback (most recent call last)" in attempt["traceback"]
    human = cli("inspect", report["run_id"], check=True).stdout
    assert "error (bug): RuntimeError: injected crash" in human and "Traceback" in human


# ------------------------------------------------------------------ the last-resort handler


def test_unexpected_orchestrator_error_prints_one_screen_and_fails_the_run(ledger_path: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINPIPE_FAULT", json.dumps({"action": "crash_orchestrator", "at": "run:start"}))
    proc = cli("run", str(QUICKSTART), *sets(f"output_dir={tmp_path / 'out'}"))

    assert_clean(proc, 1, "error: unexpected RuntimeError: injected orchestrator crash", "full traceback: ")
    assert len(proc.stderr.strip().splitlines()) <= 5
    log = Path(proc.stderr.split("full traceback: ")[1].split()[0])
    assert "Traceback (most recent call last)" in log.read_text() and "orchestrator_point" in log.read_text()
    run_id = json.loads(cli("status", "--json", check=True).stdout)[0]["run_id"]
    assert f"run: {run_id}" in proc.stderr

    status = cli("status", check=True).stdout
    assert "failed" in status and "interrupted" not in status and "trainpipe resume" not in status
    report = run_report(run_id)
    assert (report["state"], report["error_kind"]) == ("failed", "bug")
    assert "injected orchestrator crash" in report["traceback"]


# ------------------------------------------------------------------ datasets


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path: Path) -> None:
    rows_in = [json.loads(line) for line in (TASK_API / "preference.jsonl").read_text().splitlines()[:3]]
    text = "\r\n".join(json.dumps(r) for r in rows_in) + "\r\n\r\n"
    pref = tmp_path / "pref.jsonl"
    pref.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))

    assert validate_jsonl(pref, "preference") == {"rows": 3, "format": "preference"}
    assert load_rows(pref) == rows_in


@pytest.mark.parametrize(("encode", "message"), [
    (lambda text: text.encode("utf-16"), ":1: the file is UTF-16 (byte-order mark ff fe); save it as UTF-8"),
    (lambda text: text.replace("Bob", "B\xf6b", 1).encode("latin-1"), ":2: not UTF-8 (byte 0xf6"),
])
def test_other_encodings_are_refused_with_the_line(encode, message: str, ledger_path: Path, tmp_path: Path) -> None:
    lines = ['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "Bob", "chosen": "b", "rejected": "c"}']
    pref = tmp_path / "pref.jsonl"
    pref.write_bytes(encode("\n".join(lines) + "\n"))
    before = rows(ledger_path)

    proc = cli("run", str(QUICKSTART), "--preference-dataset", str(pref), *sets(f"output_dir={tmp_path / 'out'}"))

    assert_clean(proc, 2, f"error: {pref}{message}")
    assert rows(ledger_path) == before


def test_dataset_path_that_is_a_directory(ledger_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    before = rows(ledger_path)

    proc = cli("run", str(QUICKSTART), "--sft-dataset", str(folder), *sets(f"output_dir={tmp_path / 'out'}"))

    assert_clean(proc, 2, f"error: {folder}: this folder has no data files (looked for .arrow, .csv, .json, "
                          ".jsonl, .parquet)")
    assert rows(ledger_path) == before


# ------------------------------------------------------------------ --set under a disabled stage


def test_set_under_a_disabled_stage_is_still_validated(ledger_path: Path, tmp_path: Path) -> None:
    before = rows(ledger_path)
    proc = cli("run", str(QUICKSTART), *sets(f"output_dir={tmp_path / 'out'}", "stages.dpo.enabled=false",
                                             "dpo.bta=0.5"))
    assert_clean(proc, 2, "--set dpo.bta=0.5: unknown key 'dpo.bta' (did you mean 'beta'?)")
    proc = cli("run", str(QUICKSTART), *sets(f"output_dir={tmp_path / 'out'}", "stages.dpo.enabled=false",
                                             "dpo.beta=-1"))
    assert_clean(proc, 2, "--set dpo.beta=-1: key 'dpo.beta'")
    assert rows(ledger_path) == before


def test_set_under_a_disabled_stage_is_reported_as_without_effect() -> None:
    overrides = ["stages.dpo.enabled=false", "dpo.beta=0.5", "stages.dpo.retry_count=3", "sft.lora_r=4"]
    config = load_config(QUICKSTART, overrides=overrides)
    assert ineffective_overrides(config, overrides) == [
        "--set dpo.beta=0.5 has no effect: stage 'dpo' is disabled in this run",
        "--set stages.dpo.retry_count=3 has no effect: stage 'dpo' is disabled in this run",
    ]


# ------------------------------------------------------------------ the classification table


class _Hub(OSError):
    pass


_Hub.__name__ = "LocalEntryNotFoundError"


@pytest.mark.parametrize(("exc", "kind", "cause"), [
    (MemoryError(), "transient", "oom"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "transient", "oom"),
    (OSError(5, "Input/output error"), "transient", "io"),
    (TimeoutError("read timed out"), "transient", "io"),
    (FileNotFoundError(2, "No such file or directory"), "user", "user"),
    (PermissionError(13, "Permission denied"), "user", "user"),
    # A full disk, a quota, a read-only mount: the environment's, resumable once fixed (test_disk_full.py)
    (OSError(28, "No space left on device"), "environment", "disk"),
    (OSError(122, "Disk quota exceeded"), "environment", "disk"),
    (OSError(30, "Read-only file system"), "environment", "disk"),
    (RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                  'device" })'), "environment", "disk"),
    (RuntimeError("(sqlite3.OperationalError) database or disk is full"), "environment", "disk"),
    (OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
             "cached files."), "user", "user"),
    (RuntimeError("Error(s) in loading state_dict: size mismatch for lm_head.weight"), "user", "user"),
    (ValueError("Target modules {'c_attn'} not found in the base model."), "user", "user"),
    (_Hub("not in cache"), "user", "user"),
    (KeyError("loss"), "bug", "bug"),
    (TypeError("unsupported operand"), "bug", "bug"),
])
def test_failure_kinds(exc: BaseException, kind: str, cause: str) -> None:
    failure = failures.classify(exc)
    assert (failure.kind, failure.cause) == (kind, cause)
    assert failures.retryable(kind) == (kind == "transient")


def test_a_bug_raised_while_handling_a_missing_file_is_still_a_bug() -> None:
    try:
        try:
            raise FileNotFoundError(2, "No such file or directory")
        except FileNotFoundError:
            {}["key"]  # noqa: B018 - the bug
    except KeyError as exc:
        assert failures.classify(exc).kind == "bug"
    wrapped = OSError("could not load")
    wrapped.__cause__ = _Hub("not in cache")
    assert failures.classify(wrapped).kind == "user"
