"""The `upload` stage: a real offline failure (this machine cannot reach the Hub), then a resume with
the Hub client mocked at its boundary (`HfApi.create_repo` / `HfApi.upload_folder`), which retries
only the upload."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import QUICKSTART, fast_overrides
from helpers import cli

from trainpipe.engine import driver
from trainpipe.store.ledger import Ledger

TOKEN = "hf_fakeUploadToken0123456789abcdef"
REPO = "me/task-model"


def _ledger_bytes(db_url: str) -> bytes:
    file = Path(db_url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in (file, Path(f"{file}-wal")) if p.is_file())


def _assert_token_nowhere(db_url: str, out: Path, *texts: str) -> None:
    assert TOKEN.encode() not in _ledger_bytes(db_url)
    checked = 0
    for path in out.rglob("*"):  # logs, exports, specs, model files
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
            checked += 1
    assert checked > 10
    for text in texts:
        assert TOKEN not in text


def _attempts(ledger: Ledger, run_id: str) -> dict[str, list[str]]:
    by_stage: dict[str, list[str]] = {}
    for attempt in ledger.attempts(run_id):
        by_stage.setdefault(attempt["stage"], []).append(attempt["outcome"])
    return by_stage


def test_upload_fails_offline_then_resume_retries_only_the_upload(tmp_path: Path, db_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "HF_TOKEN": TOKEN}
    sets = fast_overrides(out) + ["upload_to_hub=true", f"hub_repo_id={REPO}"]
    proc = cli("run", str(QUICKSTART), "--db", db_url, *[a for s in sets for a in ("--set", s)], env=env)

    # (a) the real offline failure: exit 1, one clear message, the trained model untouched.
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = " ".join(proc.stdout.split())
    assert "upload to hub failed: cannot reach huggingface.co (" in text
    assert "Traceback" not in proc.stdout + proc.stderr
    ledger = Ledger(db_url)
    (row,) = ledger.list_runs()
    run_id = row["run_id"]
    run = ledger.get_run(run_id)
    assert run["state"] == "failed" and run["error_kind"] == "transient"
    assert f"the trained model is untouched at {run['final_model_path']}" in text
    assert f"`trainpipe resume {run_id}` retries the upload only" in text
    assert {s["name"]: s["state"] for s in ledger.stages(run_id)} == {
        "sft": "passed", "merge": "passed", "dpo": "passed", "upload": "failed"}
    (upload,) = ledger.attempts(run_id, "upload")
    assert upload["outcome"] == "failed" and upload["finished_at"] - upload["started_at"] < 30, "fails fast"
    verified = cli("verify", run_id, "--db", db_url)
    assert verified.returncode == 0 and "artifacts of" in verified.stdout, verified.stdout + verified.stderr
    artifacts = {a["path"] for a in ledger.artifacts(run_id)}
    assert any(p.startswith(run["final_model_path"]) for p in artifacts), "the final model's files are recorded"
    exported = json.loads((Path(run["run_dir"]) / "pipeline_result.json").read_text())
    assert exported["success"] is False and "upload to hub failed" in exported["stage_results"]["upload"]["error"]
    _assert_token_nowhere(db_url, out, proc.stdout, proc.stderr)
    trained_before = _attempts(ledger, run_id)
    checkpoints_before = len(ledger.checkpoints(run_id))

    # (c) a resume without the token is refused by the preflight before any write.
    transitions_before = ledger.transitions(run_id)
    no_token = cli("resume", run_id, "--db", db_url)  # the test environment has no HF_TOKEN
    assert no_token.returncode == 2 and "needs a Hub token" in no_token.stderr, no_token.stdout + no_token.stderr
    assert ledger.transitions(run_id) == transitions_before and ledger.get_run(run_id)["state"] == "failed"

    # (b) resume with the Hub answering (mocked at the client boundary): only the upload runs again.
    from huggingface_hub import HfApi

    calls: list[tuple] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", self.token, repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", self.token, kwargs["repo_id"], kwargs))
        # What the Hub needs to read: every file of the folder, present and unchanged.
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        calls.append(("files", files))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0123abcd",
                               oid="0123abcd" * 5)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    started = time.monotonic()
    result = driver.resume(run_id, ledger=Ledger(db_url))
    assert (result.state, result.exit_code) == ("succeeded", 0), result.errors
    assert time.monotonic() - started < 60

    assert [c[0] for c in calls] == ["create_repo", "upload_folder", "files"]
    assert calls[0][1:3] == (TOKEN, REPO) and calls[0][3].get("exist_ok") is True
    assert calls[1][1:3] == (TOKEN, REPO) and calls[1][3]["folder_path"] == run["final_model_path"]
    assert "model.safetensors" in calls[2][1]

    ledger = Ledger(db_url)
    after = _attempts(ledger, run_id)
    assert {k: v for k, v in after.items() if k != "upload"} == \
        {k: v for k, v in trained_before.items() if k != "upload"}, "no new training attempts"
    assert after["upload"] == ["failed", "passed"]
    assert len(ledger.checkpoints(run_id)) == checkpoints_before
    passed = [t for t in ledger.transitions(run_id) if t["stage"] == "upload" and t["trigger"] == "pass_gate"]
    assert passed[0]["detail"] == {"repo_id": REPO, "commit_url": f"https://huggingface.co/{REPO}/commit/0123abcd",
                                   "commit_oid": "0123abcd" * 5}
    exported = json.loads((Path(run["run_dir"]) / "pipeline_result.json").read_text())
    assert exported["success"] is True and exported["stages_completed"] == ["sft", "merge", "dpo", "upload"]
    assert exported["stage_results"]["upload"]["commit_oid"] == "0123abcd" * 5
    assert cli("verify", run_id, "--db", db_url).returncode == 0
    _assert_token_nowhere(db_url, out)

    status = json.loads(cli("status", "--db", db_url, "--json", check=True).stdout)
    assert (status[0]["state"], status[0]["stages_done"], status[0]["stages_total"]) == ("succeeded", 4, 4)
    report = json.loads(cli("inspect", run_id, "--db", db_url, "--json", check=True).stdout)
    upload_stage = next(s for s in report["stages"] if s["name"] == "upload")
    assert upload_stage["fingerprint"] is None and upload_stage["cache_note"] is None  # never cached
    assert upload_stage["metrics"]["commit_url"].endswith("/commit/0123abcd")


def test_hub_errors_are_classified_and_never_carry_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Hub client raises, at its boundary: a refused token is the user's to fix (exit 2), a
    network failure is transient (exit 1), and the token never survives into the message."""
    from huggingface_hub import HfApi

    from trainpipe import failures
    from trainpipe.engine import hub

    class Refused(Exception):
        response = SimpleNamespace(status_code=401)

    def refuse(self, repo_id, **kwargs):
        raise Refused(f"Invalid credentials in Authorization header Bearer {self.token} (also hf_AbCdEf123456)")

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(HfApi, "create_repo", refuse)
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(hub.UploadFailed) as refused:
        hub.push(str(folder), REPO, "run-1")
    assert refused.value.kind == failures.USER
    # The host named is the configured endpoint (HF_ENDPOINT, huggingface.co unless set when
    # huggingface_hub was first imported; test_bad_input sets it to a closed local port).
    assert f"{hub.endpoint_host()} refused the token (HTTP 401)" in refused.value.message
    assert TOKEN not in refused.value.message and "hf_AbCdEf123456" not in refused.value.message

    with pytest.raises(hub.UploadFailed) as missing:
        hub.push(str(tmp_path / "absent"), REPO, "run-1")
    assert missing.value.kind == failures.USER and "does not exist" in missing.value.message
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(hub.UploadFailed) as no_token:
        hub.push(str(folder), REPO, "run-1")
    assert "HF_TOKEN is not set" in no_token.value.message
