"""Your data as it is (issue 18): every source kind and row format reads, checks and trains through
the same path, with the tokens TRL makes; Hub datasets load by id from an offline cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QUICKSTART, TASK_API

from trainpipe.config import DatasetSource, load_config
from trainpipe.errors import DatasetError
from trainpipe.stages import data, sources

SFT_ROWS = [json.loads(line) for line in (TASK_API / "sft.jsonl").read_text().splitlines()][:48]
PREF_ROWS = [json.loads(line) for line in (TASK_API / "preference.jsonl").read_text().splitlines()][:32]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def as_sharegpt(row: dict) -> dict:
    tags = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": tags[m["role"]], "value": m["content"]} for m in row["messages"]]}


def as_alpaca(row: dict) -> dict:
    system, user, reply = row["messages"]
    return {"system": system["content"], "instruction": user["content"], "input": "", "output": reply["content"]}


def as_ultrafeedback(row: dict) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized's shape: a string prompt, and chosen/rejected as whole
    conversations that repeat it."""
    user = {"role": "user", "content": row["prompt"]}
    return {"prompt": row["prompt"], "chosen": [user, {"role": "assistant", "content": row["chosen"]}],
            "rejected": [user, {"role": "assistant", "content": row["rejected"]}], "score_chosen": 8.0}


def hub_dataset(cache: Path, repo_id: str, files: dict[str, list[dict]], readme: str | None = None,
                revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """A dataset repo as `huggingface-cli download --repo-type dataset` leaves it in the Hub cache:
    refs/main -> a snapshot folder of the repo's files (parquet here)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = cache / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for name, rows in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), snapshot / name)
    if readme:
        (snapshot / "README.md").write_text(readme, encoding="utf-8")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def offline_hf(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home, offline: only what a test lays out there can load."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read these variables once, at import; the test process imported them already.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return home


def tokenized_sft(config, tmp_path: Path, steps: int = 2):
    """Train `steps` real SFT steps through TRL on the config's SFT data; returns (the dataset TRL
    tokenized, the trainer), so tests compare tokens and loss masks as TRL made them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from trainpipe.stages.tiny_model import ensure_tiny_model
    from trainpipe.stages.training import patch_trl_for_cpu

    base = ensure_tiny_model("builtin:tiny-qwen2")
    torch.manual_seed(0)
    patch_trl_for_cpu()
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        args=SFTConfig(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=4,
                       use_cpu=True, bf16=False, report_to="none", max_length=128, save_strategy="no",
                       completion_only_loss=True, disable_tqdm=True, logging_steps=1),
        processing_class=AutoTokenizer.from_pretrained(base),
        train_dataset=data.training_dataset(config, "sft", completion_only=True))
    trainer.train()
    return trainer.train_dataset, trainer


def sft_config(source, **extra):
    return load_config(QUICKSTART, overrides=["stages.dpo.enabled=false", "stages.merge.enabled=false",
                                              "datasets.eval=null", "validation.eval_split=0"],
                       sft_dataset=source if isinstance(source, str) else None, **extra)


def with_sft_source(source: dict) -> object:
    config = sft_config(str(TASK_API / "sft.jsonl"))
    config.datasets.sft = DatasetSource.model_validate(source)
    return config


# ------------------------------------------------------------------ formats: same tokens, same loss mask


@pytest.mark.parametrize("convert", [as_sharegpt, as_alpaca], ids=["sharegpt", "alpaca"])
def test_sharegpt_and_alpaca_train_to_the_same_tokens_and_loss_mask_as_messages(convert, tmp_path):
    reference, _ = tokenized_sft(sft_config(str(write_jsonl(tmp_path / "messages.jsonl", SFT_ROWS))), tmp_path)
    converted = write_jsonl(tmp_path / "converted.jsonl", [convert(r) for r in SFT_ROWS])
    assert data.validate(converted, "sft")["format"] == convert.__name__.removeprefix("as_")

    tokenized, trainer = tokenized_sft(sft_config(str(converted)), tmp_path)

    assert trainer.state.global_step == 2
    assert tokenized["input_ids"] == reference["input_ids"]
    assert tokenized["labels"] == reference["labels"]
    # The mask is real: the prompt's tokens carry no loss, the reply's do.
    first = tokenized["labels"][0]
    assert first[0] == -100 and first[-1] != -100


def test_column_and_role_mapping(tmp_path):
    rows = [{"dialog": [{"role": {"user": "me", "assistant": "bot", "system": "system"}[m["role"]],
                         "content": m["content"]} for m in r["messages"]]} for r in SFT_ROWS]
    source = {"path": str(write_jsonl(tmp_path / "mapped.jsonl", rows)), "columns": {"messages": "dialog"},
              "roles": {"me": "user", "bot": "assistant"}}
    config = with_sft_source(source)
    assert data.validate(config.datasets.sft, "sft")["format"] == "messages"
    assert data.training_dataset(config, "sft").to_list() == \
        data.training_dataset(sft_config(str(TASK_API / "sft.jsonl")), "sft").to_list()[:48]


def test_ultrafeedback_shape_becomes_prompt_and_replies(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [as_ultrafeedback(r) for r in PREF_ROWS])
    config = load_config(QUICKSTART, preference_dataset=str(path))
    assert data.validate(config.datasets.preference, "preference")["format"] == "preference"
    row = data.training_dataset(config, "preference")[0]
    assert row["prompt"] == [{"role": "user", "content": PREF_ROWS[0]["prompt"]}]
    assert row["chosen"] == [{"role": "assistant", "content": PREF_ROWS[0]["chosen"]}]
    assert row["rejected"] == [{"role": "assistant", "content": PREF_ROWS[0]["rejected"]}]

    implicit = write_jsonl(tmp_path / "implicit.jsonl",
                           [{k: v for k, v in as_ultrafeedback(r).items() if k != "prompt"} for r in PREF_ROWS])
    assert data.validate(implicit, "preference")["format"] == "preference_implicit"
    assert data.training_dataset(load_config(QUICKSTART, preference_dataset=str(implicit)), "preference").to_list() \
        == data.training_dataset(config, "preference").to_list()


@pytest.mark.parametrize("shape", ["ultrafeedback", "implicit", "strings"])
def test_preference_shapes_train_dpo(shape, tmp_path):
    """A few real DPO steps through TRL on each preference shape, from the same pairs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trainpipe.stages.tiny_model import ensure_tiny_model
    from trainpipe.stages.training import patch_trl_for_cpu

    convert = {"ultrafeedback": as_ultrafeedback, "strings": dict,
               "implicit": lambda r: {k: v for k, v in as_ultrafeedback(r).items() if k != "prompt"}}[shape]
    config = load_config(QUICKSTART, preference_dataset=str(
        write_jsonl(tmp_path / "pref.jsonl", [convert(r) for r in PREF_ROWS])))
    base = ensure_tiny_model("builtin:tiny-qwen2")
    patch_trl_for_cpu()
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                       bf16=False, report_to="none", max_length=128, save_strategy="no", disable_tqdm=True,
                       logging_steps=1),
        processing_class=AutoTokenizer.from_pretrained(base),
        train_dataset=data.training_dataset(config, "preference"))
    trainer.train()
    assert trainer.state.global_step == 2
    first = trainer.train_dataset[0]
    assert first["chosen_ids"] != first["rejected_ids"] and first["prompt_ids"]
    assert [e for e in trainer.state.log_history if "rewards/accuracies" in e]


def test_text_rows_train_with_loss_on_every_token(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": r["messages"][1]["content"] + " -> " +
                                                 r["messages"][2]["content"]} for r in SFT_ROWS])
    tokenized, trainer = tokenized_sft(sft_config(str(path)), tmp_path)
    assert trainer.state.global_step == 2
    assert -100 not in tokenized["labels"][0] and tokenized["labels"][0] == tokenized["input_ids"][0]


# ------------------------------------------------------------------ source kinds


def _write_kind(kind: str, root: Path, rows: list[dict]) -> str:
    import datasets

    table = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        table.to_parquet(str(root / "sft.parquet"))
        return str(root / "sft.parquet")
    if kind == "csv":  # a flat format: prompt/completion strings
        flat = datasets.Dataset.from_list([{"prompt": r["messages"][1]["content"],
                                            "completion": r["messages"][2]["content"]} for r in rows])
        flat.to_csv(str(root / "sft.csv"), index=False)
        return str(root / "sft.csv")
    if kind == "json_array":
        (root / "sft.json").write_text(json.dumps(rows), encoding="utf-8")
        return str(root / "sft.json")
    if kind == "save_to_disk":
        datasets.DatasetDict({"train": table}).save_to_disk(str(root / "saved"))
        return str(root / "saved")
    if kind == "arrow":
        table.save_to_disk(str(root / "arrowdir"))
        return str(next((root / "arrowdir").glob("*.arrow")))
    if kind == "folder":
        (root / "folder").mkdir()
        table.select(range(24)).to_parquet(str(root / "folder" / "part-0.parquet"))
        table.select(range(24, len(rows))).to_parquet(str(root / "folder" / "part-1.parquet"))
        return str(root / "folder")
    if kind == "glob":
        write_jsonl(root / "shards" / "a.jsonl", rows[:24])
        write_jsonl(root / "shards" / "b.jsonl", rows[24:])
        return str(root / "shards" / "*.jsonl")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["parquet", "csv", "json_array", "save_to_disk", "arrow", "folder", "glob"])
def test_each_local_source_kind_checks_and_trains(kind, tmp_path):
    path = _write_kind(kind, tmp_path, SFT_ROWS)
    config = sft_config(path)

    checked = data.validate(config.datasets.sft, "sft")
    tokenized, trainer = tokenized_sft(config, tmp_path)

    assert checked["rows"] == len(SFT_ROWS) == len(tokenized)
    assert checked["format"] == ("prompt_completion" if kind == "csv" else "messages")
    assert trainer.state.global_step == 2
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(loss == loss for loss in losses)
    if kind != "csv":  # same rows as the JSONL they were written from, in the same order
        assert data.training_dataset(config, "sft").to_list() == \
            data.training_dataset(sft_config(str(write_jsonl(tmp_path / "ref.jsonl", SFT_ROWS))), "sft").to_list()


def test_hub_dataset_loads_by_id_offline_with_subset_split_and_revision(offline_hf, tmp_path):
    readme = ("---\nconfigs:\n- config_name: chat\n  data_files:\n  - split: train\n    path: chat/train-*.parquet\n"
              "  - split: test\n    path: chat/test-*.parquet\n- config_name: sharegpt\n  data_files:\n"
              "  - split: train\n    path: sharegpt/train-*.parquet\n---\n")
    hub_dataset(offline_hf, "acme/taskbot", {
        "chat/train-00000-of-00001.parquet": SFT_ROWS,
        "chat/test-00000-of-00001.parquet": SFT_ROWS[:8],
        "sharegpt/train-00000-of-00001.parquet": [as_sharegpt(r) for r in SFT_ROWS],
    }, readme=readme)

    config = with_sft_source({"hub": "acme/taskbot", "subset": "sharegpt"})
    assert data.validate(config.datasets.sft, "sft") | {"seconds": 0} == \
        {"rows": 48, "format": "sharegpt", "seconds": 0}
    tokenized, trainer = tokenized_sft(config, tmp_path)
    assert trainer.state.global_step == 2 and len(tokenized) == 48

    test_split = with_sft_source({"hub": "acme/taskbot", "subset": "chat", "split": "test"})
    assert data.validate(test_split.datasets.sft, "sft")["rows"] == 8
    identity = sources.identity(test_split.datasets.sft)
    assert identity["revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert identity | {"revision": None} == {"hub": "acme/taskbot", "subset": "chat", "split": "test",
                                            "revision": None, "format": "auto", "columns": {}, "roles": {}}
    # The short form.
    assert DatasetSource.model_validate("hub:acme/taskbot:test").model_dump(exclude_defaults=True) == \
        {"hub": "acme/taskbot", "split": "test"}


def test_a_new_hub_revision_or_changed_file_changes_the_fingerprint(offline_hf, tmp_path):
    from trainpipe.engine.fingerprint import stage_fingerprint

    snapshot = hub_dataset(offline_hf, "acme/taskbot", {"data/train-0.parquet": SFT_ROWS})
    config = with_sft_source({"hub": "acme/taskbot"})
    before = stage_fingerprint(config, "sft", None)
    assert stage_fingerprint(config, "sft", None) == before
    (offline_hf / "hub" / "datasets--acme--taskbot" / "refs" / "main").write_text("f" * 40)
    assert stage_fingerprint(config, "sft", None) != before
    assert snapshot.is_dir()

    local = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    config = sft_config(str(local))
    before = stage_fingerprint(config, "sft", None)
    write_jsonl(local, SFT_ROWS[:-1])
    assert stage_fingerprint(config, "sft", None) != before
    config.datasets.sft.roles = {"bot": "assistant"}
    assert stage_fingerprint(config, "sft", None) != before


def test_bad_dataset_flag_is_a_config_error():
    from trainpipe.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, sft_dataset="hub:not a/valid id")
    assert info.value.message == "--sft-dataset hub:not a/valid id: hub: 'not a/valid id' is not a Hub dataset id (ORG/NAME)"


@pytest.mark.parametrize(("source", "expected"), [
    ({"hub": "acme/taskbot", "subset": "chat", "split": "validation"},
     "hub dataset 'acme/taskbot' subset=chat split=validation: no split 'validation'; it has: train, test"),
    ({"hub": "acme/taskbot", "subset": "nope"}, "no subset 'nope'; it has: chat"),
    ({"hub": "acme/unknown"}, "hub dataset 'acme/unknown': not in the local Hugging Face cache, and the Hub "
                              "cannot be asked (offline"),
    ({"hub": "acme/taskbot", "subset": "chat", "format": "alpaca"},
     "format 'alpaca' needs column(s) ['instruction', 'output'], not in ['messages']; map yours with `columns:`"),
])
def test_bad_hub_sources_name_the_source_and_what_exists(source, expected, offline_hf, tmp_path):
    readme = ("---\nconfigs:\n- config_name: chat\n  data_files:\n  - split: train\n    path: chat/train-*.parquet\n"
              "  - split: test\n    path: chat/test-*.parquet\n---\n")
    hub_dataset(offline_hf, "acme/taskbot", {"chat/train-0.parquet": SFT_ROWS[:8],
                                             "chat/test-0.parquet": SFT_ROWS[:4]}, readme=readme)
    config = with_sft_source(source)
    with pytest.raises(DatasetError) as info:
        data.validate(config.datasets.sft, "sft")
    assert expected in info.value.message


def test_bad_row_in_parquet_names_the_row_index(tmp_path):
    rows = [dict(r) for r in SFT_ROWS]
    rows[30] = {"messages": [{"role": "user", "content": "no reply"}]}
    path = _write_kind("parquet", tmp_path, rows)
    with pytest.raises(DatasetError) as info:
        data.validate(path, "sft")
    # The row, and the config key that names the file (what the user edits).
    assert info.value.message == (f"{path} row 30: 'messages' has no assistant turn to learn from "
                                  "(set by datasets.sft or --sft-dataset)")


def test_row_checks_stream(tmp_path):
    """Rows are checked one at a time: a bad row deep in a big file is found without holding the file."""
    import tracemalloc

    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for i in range(60_000):
            out.write(json.dumps(SFT_ROWS[i % 48]) + "\n")
    tracemalloc.start()
    checked = data.validate(path, "sft")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert checked["rows"] == 60_000
    # The file is ~17 MB; parsed into Python objects it would be several times that.
    assert path.stat().st_size > 15_000_000 and peak < 2_000_000, peak
