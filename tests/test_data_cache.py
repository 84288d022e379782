"""Tokenize once (issue 18): a resumed attempt reuses the tokenized data its killed attempt prepared,
and still ends bit-identical; a damaged cache entry is rebuilt, never trained on. Asserted from the
ledger and the files, not from timing."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import QUICKSTART, TASK_API
from helpers import cli, load_weights, max_abs_diff, only_run_id, start_run, wait_for

from trainpipe.stages import data_cache
from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.slow

ROWS = 6_000  # 25 times the quickstart's SFT file


@pytest.fixture(scope="module")
def large_sft(tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in (TASK_API / "sft.jsonl").read_text().splitlines()]
    path = tmp_path_factory.mktemp("large") / "sft.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for i in range(ROWS):
            row = json.loads(json.dumps(rows[i % len(rows)]))
            row["messages"][1]["content"] += f" (#{i})"
            out.write(json.dumps(row) + "\n")
    return path


def sft_only(output_dir: Path, data: Path) -> list[str]:
    return [f"output_dir={output_dir}", f"datasets.sft={data}", "stages.merge.enabled=false",
            "stages.dpo.enabled=false", "sft.max_steps=12", "checkpoint_every_n_steps=3",
            "validation.checks.loss_went_down.severity=warn", "validation.checks.output_format_valid.severity=warn",
            "validation.max_new_tokens=32", "validation.max_eval_rows=8"]


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def sft_data(ledger: Ledger, run_id: str) -> list[dict]:
    return [(a.get("metrics") or {}).get("data", {}).get("sft", {}) for a in ledger.attempts(run_id, "sft")]


def adapter(run_dir: str) -> dict:
    return load_weights(Path(run_dir) / "sft" / "adapter_model.safetensors")


# ~60 s: CI runs it in the second environment (make test-libmin), beside the main suite.
@pytest.mark.extended
def test_resumed_attempt_reuses_tokenized_data_and_ends_bit_identical(tmp_path, db_url, large_sft):
    # The uninterrupted reference prepares its own tokenized data, in a home of its own.
    reference_env = {**os.environ, "TRAINPIPE_HOME": str(tmp_path / "reference-home"),
                     "TRAINPIPE_DB": f"sqlite:///{tmp_path / 'reference.db'}"}
    done = cli("run", str(QUICKSTART), *sets(sft_only(tmp_path / "reference", large_sft)), env=reference_env)
    assert done.returncode == 0, done.stdout + done.stderr
    reference_ledger = Ledger(reference_env["TRAINPIPE_DB"])
    reference_run = reference_ledger.get_run(only_run_id(reference_env["TRAINPIPE_DB"]))

    fault = {"stage": "sft", "step": 7, "action": "pause", "seconds": 120, "once_file": str(tmp_path / "fired")}
    proc = start_run(QUICKSTART, sft_only(tmp_path / "out", large_sft), fault)
    wait_for(lambda: (tmp_path / "fired").exists(), what="SFT to reach step 7")
    run_id = only_run_id(db_url)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    resumed = cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    ledger = Ledger(db_url)
    attempts = ledger.attempts(run_id, "sft")
    assert [a["outcome"] for a in attempts] == ["interrupted", "passed"]
    assert attempts[1]["resumed_from"].endswith("checkpoint-6")
    first, second = sft_data(ledger, run_id)
    assert first["action"] == "prepared" and first["rows"] == ROWS  # datasets.eval is set: nothing is held out
    assert second["action"] == "reused" and second["key"] == first["key"]
    assert "load_seconds" in first and "load_seconds" not in second  # the source was not even read again
    assert sorted(p.name for p in data_cache.cache_root().iterdir()) == [first["key"]]
    assert max_abs_diff(adapter(reference_run["run_dir"]), adapter(ledger.get_run(run_id)["run_dir"])) == 0.0


class _Events:
    def __init__(self) -> None:
        self.seen: list[dict] = []

    def emit(self, kind: str, **data) -> None:
        self.seen.append({"type": kind, **data})


def test_damaged_cache_entry_is_rebuilt_not_trained_on():
    """A byte flipped in a stored entry: the lookup refuses it, says why, removes it, and the next
    preparation stores a whole one again (what the stage then records as `rebuilt_because`)."""
    import datasets

    prepared = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]], "labels": [[-100, 2, 3], [4, 5]]})
    events = _Events()
    entry = data_cache.Entry("sft", "sft-sft-test")
    assert entry.lookup(events) is None  # nothing stored yet
    entry.store(prepared, 0.1, events)
    assert data_cache._verify(entry.path) is None
    assert data_cache.Entry("sft", entry.key).lookup(events)["input_ids"] == [[1, 2, 3], [4, 5]]

    arrow = next(entry.path.rglob("*.arrow"))
    damaged = bytearray(arrow.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    arrow.write_bytes(bytes(damaged))
    again = data_cache.Entry("sft", entry.key)
    assert again.lookup(events) is None
    assert again.record["rebuilt_because"].endswith("does not match its sha256")
    assert not entry.path.exists()
    again.store(prepared, 0.1, events)
    assert data_cache._verify(entry.path) is None
    assert [e["action"] for e in events.seen if e["type"] == "data"] == ["prepared", "reused", "prepared"]


def test_bad_source_exits_2_before_anything_is_written(tmp_path, db_url, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = cli("run", str(QUICKSTART), "--sft-dataset", "hub:acme/nowhere:train",
               *sets([f"output_dir={tmp_path / 'out'}"]))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "hub dataset 'acme/nowhere' split=train: not in the local Hugging Face cache" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads(cli("status", "--json", check=True).stdout) == []
    assert not (tmp_path / "out").exists()
