"""Dataset checks: every row, before any model loads; errors name file:line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from trainpipe.errors import DatasetError
from trainpipe.stages.data import validate_jsonl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "task_api"

CHAT = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}]}
PREF = {"prompt": "Add milk", "chosen": '{"action": "create_task"}', "rejected": "Sure!"}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def dataset_error(path: Path, kind: str) -> str:
    with pytest.raises(DatasetError) as info:
        validate_jsonl(path, kind)
    assert info.value.exit_code == 2
    # Every dataset error ends with the config key (or option) that names the file: what the user edits.
    option = {"sft": " or --sft-dataset", "preference": " or --preference-dataset"}.get(kind, "")
    key = f" (set by datasets.{kind}{option})"
    assert info.value.message.endswith(key), info.value.message
    return info.value.message.removesuffix(key)


# ------------------------------------------------------------------ good files


@pytest.mark.parametrize(("rows", "fmt"), [
    ([CHAT, CHAT], "messages"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}], "prompt_completion"),
    ([{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}],
     "prompt_completion"),
    ([{"text": "one document"}, {"text": "another"}], "text"),
])
def test_sft_formats(tmp_path: Path, rows: list, fmt: str) -> None:
    assert validate_jsonl(jsonl(tmp_path / "sft.jsonl", rows), "sft") == {"rows": len(rows), "format": fmt}


def test_preference_strings(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "pref.jsonl", [PREF, {**PREF, "prompt": "Another"}, PREF])
    assert validate_jsonl(path, "preference") == {"rows": 3, "format": "preference"}


def test_preference_message_lists(tmp_path: Path) -> None:
    row = {"prompt": [{"role": "user", "content": "Add milk"}],
           "chosen": [{"role": "assistant", "content": '{"action": "create_task"}'}],
           "rejected": [{"role": "assistant", "content": "Sure!"}]}
    assert validate_jsonl(jsonl(tmp_path / "pref.jsonl", [row, row]), "preference") == \
        {"rows": 2, "format": "preference"}


def test_blank_lines_are_skipped_but_counted_for_line_numbers(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "sft.jsonl", [CHAT, "", "   ", {"text": "x"}])
    message = dataset_error(path, "sft")
    assert "mix formats" in message

    path = jsonl(tmp_path / "sft2.jsonl", [CHAT, "", "{broken"])
    assert dataset_error(path, "sft").startswith(f"{path}:3: not valid JSON")


@pytest.mark.parametrize(("name", "kind", "rows", "fmt"), [
    ("sft.jsonl", "sft", 240, "messages"),
    ("preference.jsonl", "preference", 120, "preference"),
    ("eval.jsonl", "eval", 40, "messages"),
])
def test_shipped_examples_are_valid(name: str, kind: str, rows: int, fmt: str) -> None:
    assert validate_jsonl(EXAMPLES / name, kind) == {"rows": rows, "format": fmt}


# ------------------------------------------------------------------ bad files: file:line and the field


def test_missing_chosen_on_third_row(tmp_path: Path) -> None:
    bad = {"prompt": "x", "rejected": "y"}
    path = jsonl(tmp_path / "pref.jsonl", [PREF, PREF, bad, PREF])

    message = dataset_error(path, "preference")

    assert f"{path}:3: missing field 'chosen'" in message
    assert message == f"{path}:3: missing field 'chosen'"


def test_invalid_json_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "sft.jsonl", [CHAT, '{"messages": [}'])

    message = dataset_error(path, "sft")

    assert message.startswith(f"{path}:2: not valid JSON (")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "sft.jsonl"
    path.write_text(content, encoding="utf-8")

    assert dataset_error(path, "sft") == f"{path}: sft dataset is empty"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    assert dataset_error(path, "preference") == f"{path}: preference dataset not found"


def test_mixed_formats(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "sft.jsonl", [CHAT, {"prompt": "a", "completion": "b"}])

    assert dataset_error(path, "sft") == \
        f"{path}: rows mix formats ['messages', 'prompt_completion']; use one format per file"


@pytest.mark.parametrize("line", ['["a", "b"]', '"just a string"', "42", "null"])
def test_non_object_line(tmp_path: Path, line: str) -> None:
    path = jsonl(tmp_path / "sft.jsonl", [CHAT, line])

    assert dataset_error(path, "sft") == f"{path}:2: each line must be a JSON object"


def test_messages_without_assistant_turn(tmp_path: Path) -> None:
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    path = jsonl(tmp_path / "sft.jsonl", [CHAT, CHAT, CHAT, row])

    assert dataset_error(path, "sft") == f"{path}:4: 'messages' has no assistant turn to learn from"


@pytest.mark.parametrize(("row", "expected"), [
    ({"messages": []}, "field 'messages' must be a non-empty list of messages"),
    ({"messages": "hi"}, "field 'messages' must be a non-empty list of messages"),
    ({"messages": ["hi"]}, "messages[0] must be an object with 'role' and 'content'"),
    ({"messages": [{"role": "user"}]}, "missing field 'messages[0].content'"),
    ({"messages": [{"content": "x"}]}, "missing field 'messages[0].role'"),
    ({"messages": [{"role": "bot", "content": "x"}]},
     "messages[0].role 'bot' is not one of ['assistant', 'system', 'tool', 'user']"),
    ({"messages": [{"role": "assistant", "content": 3}]}, "messages[0].content must be a string"),
    ({"prompt": "a"}, "missing field 'completion'"),
    ({"completion": "b"}, "missing field 'prompt'"),
    ({"prompt": "  ", "completion": "b"}, "field 'prompt' is empty"),
    ({"text": 5}, "field 'text' must be a string"),
    ({"text": ["a"]}, "field 'text' must be a string"),
    ({"input": "a", "output": "b"}, "missing field 'instruction'"),
    ({"question": "a", "answer": "b"}, "no known row format in columns ['answer', 'question']"),
])
def test_bad_sft_rows(tmp_path: Path, row: dict, expected: str) -> None:
    path = jsonl(tmp_path / "sft.jsonl", [CHAT, row])

    assert dataset_error(path, "sft").startswith(f"{path}:2: {expected}")


@pytest.mark.parametrize(("row", "expected"), [
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "p", "chosen": 1, "rejected": "b"}, "field 'chosen' must be a string or a list of messages"),
    ({"prompt": "p", "chosen": [], "rejected": "b"}, "field 'chosen' must be a non-empty list of messages"),
])
def test_bad_preference_rows(tmp_path: Path, row: dict, expected: str) -> None:
    path = jsonl(tmp_path / "pref.jsonl", [PREF, row])

    assert dataset_error(path, "preference") == f"{path}:2: {expected}"


def test_sft_file_given_as_preference_names_first_row(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "sft.jsonl", [CHAT])

    assert dataset_error(path, "preference") == f"{path}:1: missing field 'prompt'"


def test_first_bad_row_wins(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "pref.jsonl", [PREF, {"prompt": "p"}, "not json"])

    assert dataset_error(path, "preference") == f"{path}:2: missing field 'chosen'"


def test_checking_imports_no_torch(tmp_path: Path) -> None:
    # The check runs before any model loads; it must not pull in the heavy stack on its own.
    import subprocess

    path = jsonl(tmp_path / "sft.jsonl", [CHAT])
    code = ("import sys; from trainpipe.stages.data import validate_jsonl; "
            f"validate_jsonl({str(path)!r}, 'sft'); "
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_default_eval_split_is_held_out_of_sft_and_deterministic():
    from conftest import QUICKSTART

    from trainpipe.config import load_config
    from trainpipe.stages.data import eval_rows, training_dataset

    def sft_rows(config):
        return training_dataset(config, "sft").to_list()

    config = load_config(QUICKSTART, overrides=["datasets.eval=null", "validation.eval_split=0.1"])
    trained, held_out = sft_rows(config), eval_rows(config)

    assert len(held_out) == 24 and len(trained) == 216
    as_key = lambda row: json.dumps(row, sort_keys=True)  # noqa: E731
    assert not {as_key(r) for r in trained} & {as_key(r) for r in held_out}
    assert eval_rows(config) == held_out  # same seed, same split
    with_file = load_config(QUICKSTART)
    assert len(eval_rows(with_file)) == 40 and len(sft_rows(with_file)) == 240
