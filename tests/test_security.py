"""Security claims of docs/security.md, observed: what reaches `from_pretrained` while real stages run, and
config paths that try to leave the place they belong to."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import QUICKSTART, REPO_ROOT, fast_overrides
from helpers import cli

from trainpipe.config import load_config
from trainpipe.errors import TrainpipeError
from trainpipe.paths import inside
from trainpipe.store.ledger import Ledger


def _spy_on_loaders(monkeypatch, record: Path) -> None:
    """Wrap the library entry points that load a model, config, tokenizer or adapter, appending each
    call trainpipe's code makes to `record` (a file, so the gates' forked check processes are heard
    too). The libraries' own nested calls (AutoModelForCausalLM loading its AutoConfig) are theirs."""
    import sys

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def spy(cls, label: str):
        real = cls.from_pretrained

        def from_pretrained(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not caller.startswith("trainpipe."):
                return real(*args, **kwargs)
            source = args[1] if label == "PeftModel" else args[0]
            # An adapter's folder may be a temporary one, gone once the stage ends: list it now.
            files = sorted(p.name for p in Path(source).iterdir()) if label == "PeftModel" else None
            with record.open("a", encoding="utf-8") as out:
                out.write(json.dumps({"loader": label, "caller": caller, "source": str(source), "files": files, "kwargs": {
                    k: kwargs[k] for k in ("trust_remote_code", "use_safetensors") if k in kwargs}}) + "\n")
            return real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)

    for cls, label in ((AutoModelForCausalLM, "AutoModelForCausalLM"), (AutoTokenizer, "AutoTokenizer"),
                       (AutoConfig, "AutoConfig"), (PeftModel, "PeftModel")):
        spy(cls, label)


def _run_stages_in_process(config, run_dir: Path, stages: tuple[str, ...]) -> None:
    """Each stage as its stage process runs it (attempt/worker.py: training, output, gate), here in
    this process so that the spies see it."""
    from trainpipe.attempt import worker
    from trainpipe.stages.base import StageSpec

    outputs = {"sft": run_dir / "sft", "merge": run_dir / "merged", "dpo": run_dir / "dpo"}
    inputs = {"sft": {"base_model": config.base_model},
              "merge": {"base_model": config.base_model, "sft_adapter": str(outputs["sft"])},
              "dpo": {"policy_model": str(outputs["merge"])}}
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for stage in stages:
            work = run_dir / ".work" / stage
            work.mkdir(parents=True)
            spec = StageSpec(stage=stage, run_id="security", attempt=1, config=config.model_dump(mode="json"),
                             run_dir=str(run_dir), output_dir=str(outputs[stage]), work_dir=str(work),
                             events_path=str(work / "events-1.jsonl"), result_path=str(work / "result-1.json"),
                             inputs=inputs[stage])
            spec.save(work / "spec-1.json")
            code = worker.main(["worker", str(work / "spec-1.json")])
            result = json.loads((work / "result-1.json").read_text())
            assert code == 0 and result["ok"], result.get("traceback") or result
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.slow
# Turned on, the whole pipeline runs: `make matrix` (the default case shows the same code path in SFT).
@pytest.mark.parametrize("trust", [False, pytest.param(True, marks=pytest.mark.extended)], ids=["default", "turned-on"])
def test_every_from_pretrained_gets_trust_remote_code_as_configured_and_weights_only_from_safetensors(
        trust, tmp_path, monkeypatch):
    from trainpipe.stages.tiny_model import ensure_tiny_model

    ensure_tiny_model()  # built (or found) before the spies: building it is not a stage loading it
    overrides = fast_overrides(tmp_path) + ["sft.max_steps=2", "dpo.max_steps=2", "validation.max_eval_rows=4",
                                            "validation.max_new_tokens=8"]
    if trust:
        overrides.append("trust_remote_code=true")
    config = load_config(QUICKSTART, overrides=overrides)
    assert config.trust_remote_code is trust
    record = tmp_path / "loads.jsonl"
    record.touch()
    _spy_on_loaders(monkeypatch, record)
    # The default case runs SFT and its gate; turned on, the whole pipeline.
    stages = ("sft", "merge", "dpo") if trust else ("sft",)

    _run_stages_in_process(config, tmp_path / "run", stages)

    calls = [json.loads(line) for line in record.read_text().splitlines()]
    by_loader = {label: [c for c in calls if c["loader"] == label]
                 for label in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig", "PeftModel")}
    assert by_loader["AutoModelForCausalLM"] and by_loader["AutoTokenizer"] and by_loader["PeftModel"], calls
    for call in by_loader["AutoModelForCausalLM"] + by_loader["AutoTokenizer"] + by_loader["AutoConfig"]:
        assert call["kwargs"].get("trust_remote_code") is trust, call
    for call in by_loader["AutoModelForCausalLM"]:
        assert call["kwargs"].get("use_safetensors") is True, call
    # Adapters: peft reads adapter_model.safetensors when it is there, a pickled .bin only otherwise.
    for call in by_loader["PeftModel"]:
        files = set(call["files"])
        assert "adapter_model.safetensors" in files and "adapter_model.bin" not in files, call
    if trust:
        loaded = {Path(c["source"]).name for c in by_loader["AutoModelForCausalLM"]}
        assert "merged" in loaded, loaded  # DPO's policy and reference: the merged model


def test_trust_remote_code_is_off_unless_a_config_turns_it_on(lesson_dir):
    assert load_config(QUICKSTART).trust_remote_code is False
    assert load_config(lesson_dir / "configs" / "pipeline_config.yaml", sft_dataset="sft.jsonl",
                       preference_dataset="preference.jsonl").trust_remote_code is False
    assert "trust_remote_code" not in (REPO_ROOT / "configs" / "quickstart.yaml").read_text()


# ------------------------------------------------------------------ paths that must stay where they are


@pytest.mark.parametrize("override, message", [
    ("pipeline_id=../escaped", "key 'pipeline_id': must be letters, digits"),
    ("pipeline_id=/tmp/escaped", "key 'pipeline_id': must be letters, digits"),
    ("validation.custom_checks=[../../escaped:check]", "unknown check '../../escaped:check'"),
    ("validation.custom_checks=[/tmp/escaped.py:check]", "unknown check '/tmp/escaped.py:check'"),
])
def test_a_config_path_that_would_escape_is_refused_before_anything_is_written(override, message, tmp_path, db_url):
    out = tmp_path / "box" / "out"

    proc = cli("run", str(QUICKSTART), "--set", f"output_dir={out}", "--set", override)

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert Ledger(db_url).count_runs() == 0
    assert not (tmp_path / "box").exists() and not (tmp_path / "escaped").exists()
    assert not Path("/tmp/escaped").exists()


def test_a_sweep_name_that_would_escape_is_refused(tmp_path, db_url):
    import yaml

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(QUICKSTART), "name": "../../escaped", "space": {"dpo.beta": [0.1]},
                                     "objective": {"metric": "dpo.rewards/accuracies"}}))

    proc = cli("sweep", str(sweep), "--set", f"output_dir={tmp_path / 'out'}")

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "escaped" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("parts", [("..", "outside"), ("/etc",), ("link", "file")])
def test_paths_under_a_run_dir_cannot_leave_it_by_dotdot_absolute_part_or_symlink(parts, tmp_path):
    root = tmp_path / "out" / "run"
    root.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(TrainpipeError, match="escapes the output dir"):
        inside(root, *parts)
    assert inside(root, "sft", "adapter") == root / "sft" / "adapter"
