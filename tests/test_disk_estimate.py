"""The disk check for a base model that is not in the local HF cache: the preflight's one Hub request
(`model_info` with file sizes) also sizes the run's outputs and its download into the HF cache, and
the download is checked against the cache's filesystem (output_dir's too when they share one).

The Hub is the one boundary mocked: `HfApi.model_info` returns a real `ModelInfo` built from the
JSON the Hub answers (as `HfApi.model_info` builds it), and `hf_hub_download` returns a config.json
written here (Qwen2.5-0.5B's published one). Everything else is real: the filesystems' free space
(tmp's, and a tmpfs for a cache on its own filesystem), the ledger, the CLI's own `main()` in this
process (a subprocess would not see the mocks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import QUICKSTART

from trainpipe.config import load_config
from trainpipe.diskspace import human
from trainpipe.engine import preflight
from trainpipe.errors import PreflightError
from trainpipe.stages import hub_model
from trainpipe.stages.footprint import explain
from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.timeout(180)

QWEN_05B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
    "max_position_embeddings": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
QWEN_05B_PARAMS = 494_032_768
# The repo's small files, with their published sizes.
SMALL_FILES = {"config.json": 681, "generation_config.json": 242, "tokenizer.json": 7_031_645,
               "tokenizer_config.json": 7_305, "vocab.json": 2_776_833, "merges.txt": 1_671_853,
               "README.md": 5_020, "LICENSE": 11_343}
# What from_pretrained fetches of them: not the README nor the LICENSE.
FETCHED_SMALL_FILES = sum(size for name, size in SMALL_FILES.items() if name not in ("README.md", "LICENSE"))


def hub_answer(repo_id: str, weights: dict[str, int], *, params: int | None) -> dict:
    """The JSON /api/models/{id}?blobs=true answers: every file with its size (LFS files with their
    LFS record), and the safetensors summary when the Hub has parsed the weights."""
    siblings = [{"rfilename": name, "size": size, "blobId": "0" * 40} for name, size in SMALL_FILES.items()]
    siblings += [{"rfilename": name, "size": size, "blobId": "1" * 40,
                  "lfs": {"size": size, "sha256": "2" * 64, "pointerSize": 135}} for name, size in weights.items()]
    siblings.append({"rfilename": "onnx/model.safetensors", "size": 10**12, "blobId": "3" * 40})  # not fetched
    answer = {"id": repo_id, "sha": "4" * 40, "private": False, "gated": False, "siblings": siblings}
    if params:
        answer["safetensors"] = {"parameters": {"BF16": params}, "total": params}
    return answer


class FakeHub:
    """HfApi.model_info and hf_hub_download, answering for any repo id from `models`; counts the
    model_info requests and what they asked for."""

    def __init__(self, tmp: Path):
        self.models: dict[str, dict] = {}
        self.calls: list[dict] = []
        self.config_dir = tmp / "downloaded"
        self.config_dir.mkdir()
        self.download_error: Exception | None = None
        self.info_error: Exception | None = None

    def model_info(self, api, repo_id, *, revision=None, timeout=None, files_metadata=False, token=None, **kw):
        from huggingface_hub.hf_api import ModelInfo

        self.calls.append({"repo_id": repo_id, "files_metadata": files_metadata, "timeout": timeout})
        if self.info_error:
            raise self.info_error
        answer = dict(self.models[repo_id])
        if not files_metadata:  # the Hub lists the files' sizes only when asked (blobs=true)
            answer["siblings"] = [{"rfilename": f["rfilename"]} for f in answer["siblings"]]
        return ModelInfo(**answer)

    def hf_hub_download(self, repo_id, filename, **kw):
        if self.download_error:
            raise self.download_error
        assert filename == "config.json", filename
        path = self.config_dir / repo_id.replace("/", "--") / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(QWEN_05B_CONFIG))
        return str(path)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """An empty HF cache under tmp (huggingface_hub.constants read the environment at import, so they
    are set too), online, and the fake Hub; no answer kept from another test."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    cache = tmp_path / "hf-home" / "hub"  # not created: the check walks up to what exists
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Stage processes (the --force run) inherit this: they fail at once instead of asking a real Hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake = FakeHub(tmp_path)
    monkeypatch.setattr(HfApi, "model_info", lambda api, *a, **kw: fake.model_info(api, *a, **kw))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    hub_model.forget()
    yield fake
    hub_model.forget()


def run_rows(db_url: str) -> list[dict]:
    ledger = Ledger(db_url)
    try:
        return ledger.list_runs(limit=None)
    finally:
        ledger.close()


def sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def one_line(text: str) -> str:
    """Rich wraps long messages at the terminal's width; the assertions read them unwrapped."""
    return " ".join(text.split())


def test_a_download_bigger_than_the_shared_filesystem_is_refused_and_force_starts_anyway(
        hub: FakeHub, trainpipe, tmp_path: Path, db_url: str) -> None:
    free = shutil.disk_usage(tmp_path).free
    size = free + 10**9  # more than this filesystem has, whatever it has
    hub.models["org/too-big"] = hub_answer("org/too-big", {"model.safetensors": size}, params=QWEN_05B_PARAMS)
    out = tmp_path / "out"
    cache = Path(str(tmp_path / "hf-home" / "hub"))

    proc = trainpipe("run", str(QUICKSTART), *sets(f"output_dir={out}", "base_model=org/too-big"), "--db", db_url)
    message = one_line(proc.stdout + proc.stderr)
    assert proc.returncode == 2, message
    # One filesystem (tmp's) holds both: both directories, its free space, the download and the outputs.
    assert f"output_dir '{out}' and the HF cache '{cache}': their filesystem ({tmp_path}) has" in message, message
    assert "this run will download and write about" in message, message
    assert f"base model download ~{human(size + FETCHED_SMALL_FILES)} into {cache}" in message, message
    assert f"1 weight file {human(size)}" in message, message
    assert "merge ~" in message and "sft ~" in message and "point HF_HOME (or HF_HUB_CACHE)" in message, message
    assert "--force" in message and "Traceback" not in message, message
    assert run_rows(db_url) == [] and not out.exists()
    # One Hub request served both checks, and it asked for the files' sizes.
    assert [(c["repo_id"], c["files_metadata"]) for c in hub.calls] == [("org/too-big", True)], hub.calls

    # --force: past the disk check; the run is created and then fails for want of the model (offline
    # in the stage process), which is not the disk refusal.
    hub_model.forget()
    hub.calls.clear()
    proc = trainpipe("run", str(QUICKSTART), *sets(f"output_dir={out}", "base_model=org/too-big"), "--force",
                     "--db", db_url)
    message = one_line(proc.stdout + proc.stderr)
    assert "will download about" not in message and "will write about" not in message, message
    assert len(run_rows(db_url)) == 1 and out.is_dir(), message
    assert len(hub.calls) == 1, hub.calls  # the base model check still asks, once


def test_a_download_bigger_than_the_cache_filesystem_alone_is_refused_naming_it(
        hub: FakeHub, trainpipe, small_fs, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    disk = small_fs("4m")
    cache = disk / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    hub.models["org/small"] = hub_answer("org/small", {"model.safetensors": 3_000_000}, params=1_500_000)
    out = tmp_path / "out"

    proc = trainpipe("run", str(QUICKSTART), *sets(f"output_dir={out}", "base_model=org/small"), "--db", db_url)
    message = one_line(proc.stdout + proc.stderr)
    assert proc.returncode == 2, message
    # The tmpfs holds the cache alone: 3 MB of weights plus the tokenizer's ~11.5 MB do not fit in 4 MB.
    assert f"the HF cache '{cache}': its filesystem ({disk}) has" in message, message
    assert "will download about" in message and f"into {cache}" in message, message
    assert "1 weight file 3.0 MB" in message and "config and tokenizer files" in message, message
    assert f"output_dir '{out}'" not in message and "sft ~" not in message, message  # tmp has room for those
    assert run_rows(db_url) == [] and not out.exists()
    assert len(hub.calls) == 1


def test_on_one_filesystem_the_download_and_the_outputs_add_up(
        hub: FakeHub, small_fs, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fits on its own; together they do not."""
    from huggingface_hub import constants

    hub.models["org/small"] = hub_answer("org/small", {"model.safetensors": 3_000_000}, params=1_500_000)
    overrides = ["base_model=org/small", "stages.merge.enabled=false", "stages.dpo.enabled=false",
                 "sft.max_steps=2", "checkpoint_every_n_steps=1"]
    found, _ = explain(load_config(QUICKSTART, overrides=overrides), hub=True)
    out_need, download = found.total, found.download.total
    disk = small_fs(str(max(out_need, download) + min(out_need, download) // 2))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(disk / "hf" / "hub"))
    config = load_config(QUICKSTART, overrides=[*overrides, f"output_dir={disk / 'out'}"])
    ledger = Ledger(db_url)
    try:
        with pytest.raises(PreflightError) as refused:
            preflight.check(config, ledger)
    finally:
        ledger.close()
    message = refused.value.message
    assert message.startswith(f"output_dir '{disk / 'out'}' and the HF cache '{disk / 'hf' / 'hub'}': their "
                              f"filesystem ({disk}) has"), message
    assert f"will download and write about {human(out_need + download)} there" in message, message
    assert len(hub.calls) == 1


def test_a_small_model_passes_with_one_hub_request_and_its_sizes_come_from_the_hub(
        hub: FakeHub, tmp_path: Path, db_url: str) -> None:
    weights = {"model-00001-of-00002.safetensors": 600_000, "model-00002-of-00002.safetensors": 400_000,
               "consolidated.safetensors": 10**12}  # another copy of the weights: not fetched
    hub.models["org/tiny"] = hub_answer("org/tiny", weights, params=500_000)
    hub.models["org/tiny"]["siblings"].append({"rfilename": "model.safetensors.index.json", "size": 20_000})
    config = load_config(QUICKSTART, overrides=[f"output_dir={tmp_path / 'out'}", "base_model=org/tiny",
                                                "sft.max_steps=2", "dpo.max_steps=2"])  # ~150 MB to write
    ledger = Ledger(db_url)
    try:
        assert preflight.check(config, ledger) == []  # no problem, nothing skipped
    finally:
        ledger.close()
    assert [(c["repo_id"], c["files_metadata"]) for c in hub.calls] == [("org/tiny", True)], hub.calls

    found, skipped = explain(config, hub=True)  # the same process: the kept answer, no second request
    assert skipped is None and len(hub.calls) == 1
    assert dict(found.download.parts) == {"2 weight files": 1_000_000,
                                          "config and tokenizer files": FETCHED_SMALL_FILES + 20_000}
    assert found.download.where == str(tmp_path / "hf-home" / "hub")
    tokenizer = sum(SMALL_FILES[n] for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"))
    # merge.dtype of the quickstart: its merged model is the parameters at that width, plus the tokenizer.
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[config.merge.dtype]
    assert found.of("merge").total == 500_000 * width + tokenizer
    # The LoRA adapter from Qwen2.5-0.5B's shape: rank x (in + out) per targeted projection, x 24 layers.
    dims = {"q_proj": (896, 896), "k_proj": (896, 128), "v_proj": (896, 128), "o_proj": (896, 896),
            "gate_proj": (896, 4864), "up_proj": (896, 4864), "down_proj": (4864, 896)}
    lora = sum(config.sft.lora_r * (a + b) for name, (a, b) in dims.items() if name in config.sft.target_modules)
    assert dict(found.of("sft").parts)["adapter"] == lora * 24 * 4 + tokenizer


def test_without_a_parameter_count_the_weights_sizes_stand_in(hub: FakeHub, tmp_path: Path) -> None:
    hub.models["org/unparsed"] = hub_answer("org/unparsed", {"model.safetensors": 3_000_000}, params=None)
    config = load_config(QUICKSTART, overrides=[f"output_dir={tmp_path / 'out'}", "base_model=org/unparsed"])
    found, skipped = explain(config, hub=True)
    assert skipped is None
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[config.merge.dtype]
    # bfloat16 weights (config.json's torch_dtype): 3 MB are 1.5 M parameters.
    assert dict(found.of("merge").parts)[f"merged model ({config.merge.dtype})"] - 1_500_000 * width < 20_000_000


def test_when_the_hub_cannot_size_the_model_the_disk_check_is_skipped_and_said(
        hub: FakeHub, trainpipe, tmp_path: Path, db_url: str) -> None:
    free = shutil.disk_usage(tmp_path).free
    hub.models["org/huge"] = hub_answer("org/huge", {"model.safetensors": free + 10**9}, params=QWEN_05B_PARAMS)
    hub.download_error = ConnectionError("Max retries exceeded with url: /org/huge/config.json")
    config = load_config(QUICKSTART, overrides=[f"output_dir={tmp_path / 'out'}", "base_model=org/huge"])
    ledger = Ledger(db_url)
    try:
        notes = preflight.check(config, ledger)  # not refused for disk: its size is unknown
        # The Hub unreachable altogether: refused for the base model (as before), not for disk.
        hub_model.forget()
        hub.info_error = ConnectionError("Connection refused")
        with pytest.raises(PreflightError) as refused:
            preflight.check(config, ledger)
    finally:
        ledger.close()
    assert len(notes) == 1, notes
    assert notes[0].startswith("disk space not checked: the size of 'org/huge' could not be read from the Hub "
                               "(ConnectionError: Max retries exceeded"), notes
    assert "the run starts without knowing whether it fits" in notes[0]
    assert "the Hub is unreachable" in refused.value.message and "free" not in refused.value.message

    # Through the CLI: the run starts (and fails later, for want of the model) and says the check was skipped,
    # after its run id (scripts read that from the first line).
    hub_model.forget()
    hub.info_error = None
    out = tmp_path / "out"
    proc = trainpipe("run", str(QUICKSTART), *sets(f"output_dir={out}", "base_model=org/huge"), "--db", db_url)
    text = one_line(proc.stdout + proc.stderr)
    assert "disk space not checked: the size of 'org/huge' could not be read from the Hub" in text, text
    assert proc.stdout.startswith("Run "), proc.stdout
    assert len(run_rows(db_url)) == 1 and "will download" not in text


@pytest.mark.parametrize(("space", "strategy", "expected"), [
    ({"dpo.beta": [0.05, 0.1, 0.3]}, "grid", (3, {"sft": 1, "merge": 1, "dpo": 3})),
    ({"merge.dtype": ["float32", "bfloat16"]}, "grid", (2, {"sft": 1, "merge": 2, "dpo": 2})),
    ({"sft.learning_rate": {"low": 1.0e-4, "high": 1.0e-3, "log": True}}, "random",
     (5, {"sft": 5, "merge": 5, "dpo": 5})),
    ({"seed": [1, 2]}, "grid", (2, {"sft": 2, "merge": 2, "dpo": 2})),
])
def test_a_sweep_writes_a_stage_once_unless_a_swept_key_touches_it_or_a_stage_upstream(
        tmp_path: Path, space: dict, strategy: str, expected: tuple) -> None:
    import yaml

    from trainpipe.config.sweepfile import load_sweep
    from trainpipe.engine.sweep import disk_copies

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(QUICKSTART), "space": space, "strategy": strategy,
                                     **({"n_trials": 5} if strategy != "grid" else {}),
                                     "objective": {"metric": "dpo.rewards/accuracies"}}))
    spec, config = load_sweep(sweep)
    assert tuple(disk_copies(spec, config)) == expected
