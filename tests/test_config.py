"""Config loading: the lesson's files as written, precedence, and one clear error per bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainpipe.config import load_config
from trainpipe.errors import EXIT_USAGE, ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"
PIPELINE = "configs/pipeline_config.yaml"


def load(**kwargs):
    """Load the lesson's pipeline config from inside `lesson_dir`, with the lesson's datasets."""
    kwargs.setdefault("sft_dataset", "sft.jsonl")
    kwargs.setdefault("preference_dataset", "preference.jsonl")
    return load_config(PIPELINE, **kwargs)


def config_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    assert info.value.exit_code == EXIT_USAGE == 2
    return info.value.message


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"fixture drifted: {old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


@pytest.fixture
def files(lesson_dir: Path) -> dict[str, Path]:
    configs = lesson_dir / "configs"
    return {"pipeline": configs / "pipeline_config.yaml", "sft": configs / "sft_config.yaml",
            "dpo": configs / "dpo_config.yaml"}


# ------------------------------------------------------------------ the lesson's files load as written


def test_lesson_fixtures_load_verbatim(lesson_dir: Path) -> None:
    config = load()

    assert config.pipeline_id == "task-api-v1.0"
    assert config.base_model == "unsloth/Qwen2.5-3B-Instruct-bnb-4bit"
    # from configs/sft_config.yaml
    assert config.sft.lora_r == 16
    assert config.sft.lora_alpha == 32
    assert config.sft.epochs == 3
    assert config.sft.learning_rate == pytest.approx(2e-4)
    assert config.sft.save_steps == 100
    # from configs/dpo_config.yaml
    assert config.dpo.beta == pytest.approx(0.1)
    assert config.dpo.gradient_accumulation == 8
    assert config.dpo.lora_r == 8
    assert config.dpo.learning_rate == pytest.approx(5e-5)
    # stage entries
    assert [s.name for s in config.stages] == ["sft", "merge", "dpo"]
    assert [(s.timeout_minutes, s.retry_count) for s in config.stages] == [(180, 2), (30, 1), (120, 2)]
    assert all(s.enabled for s in config.stages)
    # pipeline-level keys
    assert config.validation.max_loss == 2.0
    assert config.validation.min_accuracy == pytest.approx(0.7)
    assert config.validation.check_nan is True
    assert config.validation.custom_checks == ["output_format_valid", "no_harmful_content"]
    assert config.checkpoint_every_n_steps == 100
    assert config.gpu_memory_fraction == pytest.approx(0.9)
    assert config.upload_to_hub is False


def test_lesson_paths_become_absolute(lesson_dir: Path) -> None:
    config = load()
    root = lesson_dir.resolve()

    assert Path(config.datasets.sft.path).is_absolute()
    assert Path(config.datasets.sft.path) == root / "sft.jsonl"
    assert Path(config.datasets.preference.path) == root / "preference.jsonl"
    assert Path(config.output_dir) == root / "artifacts"
    assert Path(config.stage("sft").config_path) == root / "configs" / "sft_config.yaml"
    assert Path(config.stage("dpo").config_path) == root / "configs" / "dpo_config.yaml"
    assert config.stage("merge").config_path is None


def test_stage_file_value_beats_default(files: dict[str, Path]) -> None:
    edit(files["sft"], "lora_r: 16", "lora_r: 64")
    edit(files["dpo"], "beta: 0.1", "beta: 0.25")

    config = load()

    assert config.sft.lora_r == 64
    assert config.dpo.beta == pytest.approx(0.25)


# ------------------------------------------------------------------ precedence


def test_inline_block_beats_stage_file(files: dict[str, Path]) -> None:
    append(files["pipeline"], "\nsft:\n  lora_r: 32\ndpo:\n  beta: 0.5\n")

    config = load()

    assert config.sft.lora_r == 32          # inline wins
    assert config.sft.epochs == 3           # the file's other keys still apply
    assert config.sft.save_steps == 100
    assert config.dpo.beta == pytest.approx(0.5)
    assert config.dpo.gradient_accumulation == 8


def test_set_beats_inline_and_stage_file(files: dict[str, Path]) -> None:
    append(files["pipeline"], "\nsft:\n  learning_rate: 3.0e-4\n")

    assert load().sft.learning_rate == pytest.approx(3e-4)
    config = load(overrides=["sft.learning_rate=1e-4", "dpo.beta=0.3"])

    assert config.sft.learning_rate == pytest.approx(1e-4)
    assert config.dpo.beta == pytest.approx(0.3)


def test_set_addresses_a_stage_by_name(lesson_dir: Path) -> None:
    config = load(overrides=["stages.dpo.enabled=false", "stages.sft.retry_count=5"], preference_dataset=None)

    assert config.enabled("dpo") is False
    assert config.enabled("sft") is True
    assert config.stage("sft").retry_count == 5
    assert config.stage("dpo").retry_count == 2  # untouched
    assert config.datasets.preference is None   # not needed once dpo is off


def test_set_disables_sft_and_merge_together(lesson_dir: Path) -> None:
    config = load(overrides=["stages.sft.enabled=false", "stages.merge.enabled=false"], sft_dataset=None)

    assert [s.enabled for s in config.stages] == [False, False, True]


def test_set_addresses_a_stage_by_index(lesson_dir: Path) -> None:
    assert load(overrides=["stages.2.timeout_minutes=7"]).stage("dpo").timeout_minutes == 7


# ------------------------------------------------------------------ bad input: one message naming file and key


def test_unknown_nested_key_suggests_the_right_one(files: dict[str, Path]) -> None:
    edit(files["pipeline"], "  max_loss: 2.0", "  max_los: 2.0")

    message = config_error()

    assert message == f"{PIPELINE}: unknown key 'validation.max_los' (did you mean 'max_loss'?)"


def test_unknown_top_level_key_suggests_pipeline_id(files: dict[str, Path]) -> None:
    edit(files["pipeline"], "pipeline_id:", "pipline_id:")

    message = config_error()

    assert f"{PIPELINE}: unknown key 'pipline_id' (did you mean 'pipeline_id'?)" in message.splitlines()
    assert f"{PIPELINE}: missing required key 'pipeline_id'" in message.splitlines()


def test_unknown_key_in_sft_stage_file_names_that_file(files: dict[str, Path]) -> None:
    append(files["sft"], "lerning_rate: 1.0e-4\n")

    message = config_error()

    assert message == f"{files['sft'].resolve()}: unknown key 'lerning_rate' (did you mean 'learning_rate'?)"
    assert "pipeline_config.yaml" not in message


def test_unknown_key_in_dpo_stage_file_names_that_file(files: dict[str, Path]) -> None:
    append(files["dpo"], "betta: 0.2\n")

    message = config_error()

    assert message == f"{files['dpo'].resolve()}: unknown key 'betta' (did you mean 'beta'?)"


def test_unknown_key_in_stage_entry(files: dict[str, Path]) -> None:
    edit(files["pipeline"], "    retry_count: 1", "    retry_cont: 1")

    message = config_error()

    assert message.startswith(f"{PIPELINE}: unknown key 'stages[1].retry_cont'")
    assert message.endswith("(did you mean 'retry_count'?)")


def test_wrong_type_in_stage_file(files: dict[str, Path]) -> None:
    edit(files["sft"], "lora_r: 16", 'lora_r: "abc"')

    message = config_error()

    assert message.startswith(f"{files['sft'].resolve()}: key 'lora_r': ")
    assert "valid integer" in message
    assert "(got 'abc')" in message


@pytest.mark.parametrize(("which", "old", "new", "key", "bound", "got"), [
    ("sft", "learning_rate: 2.0e-4", "learning_rate: -1", "learning_rate", "greater than 0", "-1"),
    ("sft", "lora_dropout: 0.05", "lora_dropout: 1.0", "lora_dropout", "less than 1", "1.0"),
    ("dpo", "gradient_accumulation: 8", "gradient_accumulation: 0", "gradient_accumulation",
     "greater than or equal to 1", "0"),
    ("pipeline", "min_accuracy: 0.7", "min_accuracy: 1.5", "validation.min_accuracy",
     "less than or equal to 1", "1.5"),
    ("pipeline", "retry_count: 2", "retry_count: 11", "stages[0].retry_count", "less than or equal to 10", "11"),
    ("pipeline", "gpu_memory_fraction: 0.9", "gpu_memory_fraction: 0", "gpu_memory_fraction", "greater than 0",
     "0"),
])
def test_out_of_range_values(files: dict[str, Path], which: str, old: str, new: str, key: str, bound: str,
                             got: str) -> None:
    edit(files[which], old, new)
    source = PIPELINE if which == "pipeline" else str(files[which].resolve())

    message = config_error()

    assert message == f"{source}: key '{key}': Input should be {bound} (got {got})"


def test_missing_required_key(files: dict[str, Path]) -> None:
    edit(files["pipeline"], "pipeline_id: task-api-v1.0\n", "")

    assert config_error() == f"{PIPELINE}: missing required key 'pipeline_id'"


def test_stage_config_path_that_does_not_exist(files: dict[str, Path]) -> None:
    edit(files["pipeline"], "./configs/dpo_config.yaml", "./configs/dpo.yaml")

    message = config_error()

    assert message.startswith(f"{PIPELINE}: key 'stages[2].config_path': file './configs/dpo.yaml' does not exist")


def test_missing_pipeline_file(lesson_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("configs/nope.yaml")
    assert info.value.message == "configs/nope.yaml: pipeline config not found"


def test_yaml_syntax_error_names_file_and_line(files: dict[str, Path]) -> None:
    # line 2 of the pipeline file becomes `base_model: a: b`
    edit(files["pipeline"], "base_model: unsloth/Qwen2.5-3B-Instruct-bnb-4bit", "base_model: a: b")

    message = config_error()

    assert message.startswith(f"{PIPELINE}:2: not valid YAML")
    assert "mapping values are not allowed here" in message


def test_yaml_syntax_error_in_stage_file_names_that_file_and_line(files: dict[str, Path]) -> None:
    lines = files["sft"].read_text(encoding="utf-8").splitlines()
    bad_line = next(i for i, line in enumerate(lines, start=1) if line.startswith("epochs:"))
    edit(files["sft"], "epochs: 3", "epochs: [3")

    message = config_error()

    assert message.startswith(f"{files['sft'].resolve()}:{bad_line + 1}: not valid YAML")


def test_top_level_must_be_a_mapping(files: dict[str, Path]) -> None:
    files["pipeline"].write_text("- sft\n- dpo\n", encoding="utf-8")

    assert config_error() == f"{PIPELINE}: expected a mapping of keys at the top level, got list"


def test_set_without_equals(lesson_dir: Path) -> None:
    message = config_error(overrides=["sft.learning_rate"])

    assert message.startswith("--set sft.learning_rate: expected key=value")


def test_set_unknown_key_names_the_set(lesson_dir: Path) -> None:
    message = config_error(overrides=["sft.lerning_rate=1e-4"])

    assert message == "--set sft.lerning_rate=1e-4: unknown key 'sft.lerning_rate' (did you mean 'learning_rate'?)"


def test_set_bad_value_names_the_set(lesson_dir: Path) -> None:
    message = config_error(overrides=["sft.learning_rate=-1"])

    assert message.startswith("--set sft.learning_rate=-1: key 'sft.learning_rate': Input should be greater than 0")


def test_set_unknown_stage_name(lesson_dir: Path) -> None:
    assert config_error(overrides=["stages.eval.enabled=false"]) == \
        "--set stages.eval.enabled=false: no stage 'eval' in stages"


def test_set_bad_stage_value_by_name_names_the_set(lesson_dir: Path) -> None:
    message = config_error(overrides=["stages.sft.retry_count=99"])

    assert message.startswith("--set stages.sft.retry_count=99: ")


def test_unknown_custom_check(files: dict[str, Path]) -> None:
    edit(files["pipeline"], "- no_harmful_content", "- no_harmfull_content")

    message = config_error()

    assert message.startswith(f"{PIPELINE}: key 'validation.custom_checks': unknown check 'no_harmfull_content' "
                              "(did you mean 'no_harmful_content'?)")


def test_dotted_custom_check_is_accepted(files: dict[str, Path]) -> None:
    edit(files["pipeline"], "- no_harmful_content", "- trainpipe_test_checks:counts_eval_rows")

    assert load().validation.custom_checks == ["output_format_valid", "trainpipe_test_checks:counts_eval_rows"]


def test_custom_check_module_that_does_not_import(files: dict[str, Path]) -> None:
    edit(files["pipeline"], "- no_harmful_content", "- my_pkg.checks:no_pii")

    message = config_error()

    assert message.startswith(f"{PIPELINE}: key 'validation.custom_checks': custom check 'my_pkg.checks:no_pii' "
                              "(item 1): cannot import module 'my_pkg.checks'")


def test_custom_check_function_that_does_not_exist(files: dict[str, Path]) -> None:
    edit(files["pipeline"], "- no_harmful_content", "- trainpipe_test_checks:no_such_check")

    message = config_error()

    assert "module 'trainpipe_test_checks' has no function 'no_such_check'" in message


def test_override_for_an_unknown_check(files: dict[str, Path]) -> None:
    append(files["pipeline"], "\n")
    message = config_error(overrides=["validation.checks.loss_went_dwn.severity=warn"])

    assert "unknown check 'loss_went_dwn' (did you mean 'loss_went_down'?)" in message


def test_blocklist_pattern_that_is_not_a_regex(files: dict[str, Path]) -> None:
    message = config_error(overrides=["validation.blocklist=['(unclosed']"])

    assert "blocklist pattern '(unclosed' is not a valid regex" in message


def test_dpo_enabled_without_preference_dataset(lesson_dir: Path) -> None:
    message = config_error(preference_dataset=None)

    assert message.startswith(f"{PIPELINE}: stage 'dpo' is enabled but no preference dataset is set")


def test_sft_enabled_without_sft_dataset(lesson_dir: Path) -> None:
    message = config_error(sft_dataset=None)

    assert message.startswith(f"{PIPELINE}: stage 'sft' is enabled but no SFT dataset is set")


def test_dataset_that_does_not_exist(lesson_dir: Path) -> None:
    message = config_error(preference_dataset="missing.jsonl")

    assert message == f"{PIPELINE}: key 'datasets.preference': file 'missing.jsonl' does not exist"


def test_merge_enabled_with_sft_disabled(files: dict[str, Path]) -> None:
    edit(files["pipeline"], "  - name: sft\n    enabled: true", "  - name: sft\n    enabled: false")

    message = config_error(sft_dataset=None)

    assert message.startswith(f"{PIPELINE}: ")
    assert "stage 'merge' needs stage 'sft' enabled" in message


def test_duplicate_stage_names(files: dict[str, Path]) -> None:
    edit(files["pipeline"], "  - name: merge", "  - name: sft")

    message = config_error()

    assert message.startswith(f"{PIPELINE}: ")
    assert "stage names repeat: ['sft', 'sft', 'dpo']" in message


def test_stages_out_of_order(files: dict[str, Path]) -> None:
    text = files["pipeline"].read_text(encoding="utf-8")
    files["pipeline"].write_text(text.replace("name: sft", "name: TMP").replace("name: dpo", "name: sft")
                                 .replace("name: TMP", "name: dpo"), encoding="utf-8")

    message = config_error()

    assert "stages must run in the order sft -> merge -> dpo" in message


def test_errors_write_nothing(files: dict[str, Path], lesson_dir: Path) -> None:
    append(files["sft"], "lerning_rate: 1\n")
    before = sorted(p.relative_to(lesson_dir) for p in lesson_dir.rglob("*"))

    config_error()

    assert sorted(p.relative_to(lesson_dir) for p in lesson_dir.rglob("*")) == before


# ------------------------------------------------------------------ the shipped quickstart


def test_quickstart_loads_from_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    config = load_config(QUICKSTART)

    examples = (REPO_ROOT / "examples" / "task_api").resolve()
    assert config.pipeline_id == "quickstart"
    assert config.base_model == "builtin:tiny-qwen2"
    assert Path(config.datasets.sft.path) == examples / "sft.jsonl"
    assert Path(config.datasets.preference.path) == examples / "preference.jsonl"
    assert Path(config.datasets.eval.path) == examples / "eval.jsonl"
    assert all(Path(p).is_file() for p in (config.datasets.sft.path, config.datasets.preference.path, config.datasets.eval.path))
    assert Path(config.output_dir) == tmp_path.resolve() / "artifacts" / "quickstart"
    # inline blocks, no config_path files
    assert config.sft.lora_r == 8
    assert config.sft.learning_rate == pytest.approx(5e-3)
    assert config.dpo.save_merged is True
    assert config.checkpoint_interval("sft") == 10


def test_quickstart_with_explicit_cwd(tmp_path: Path) -> None:
    config = load_config(QUICKSTART, cwd=tmp_path, overrides=["output_dir=out"])

    assert Path(config.output_dir) == tmp_path.resolve() / "out"
    assert Path(config.datasets.sft.path).is_file()
