"""Checks that run before a run is created (and before a resume claims one): everything a stage would
otherwise discover minutes in, at the cost of a few file lookups and at most one Hub request. Every
dataset row is checked (validate_inputs), and a resume compares its environment with the run's
(check_environment).

Every problem found is reported, one line each, naming the key and the path or model; nothing is
written to the ledger or the output dir. Heavy imports stay inside the functions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from trainpipe.config import STAGE_ORDER, UPLOAD_STAGE, PipelineConfig
from trainpipe.engine import lineage
from trainpipe.engine.machine import STAGE_DONE
from trainpipe.engine.observer import Observer
from trainpipe.engine.stage_attempt import stage_inputs
from trainpipe.errors import ConfigError, EnvironmentChanged, LedgerError, PreflightError
from trainpipe.paths import dir_problem
from trainpipe.stages.data import dataset_roles, validate
from trainpipe.credentials import hub_token
from trainpipe.store.ledger import Ledger

# namespace/name (or a bare name), as the Hub allows them.
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
WEIGHTS = ("*.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check(config: PipelineConfig, ledger: Ledger, *, needs_base_model: bool = True,
          disk_stages: list[str] | None = None, check_disk: bool = True,
          sweep: SweepCopies | None = None) -> list[str]:
    """PreflightError listing every problem; else the notes to show once the run (or sweep) is
    created (a disk check that could not be made, and why). `disk_stages`: the stages still to write
    (a resume), default all; `check_disk=False` (`--force`) skips the space check; `sweep`: the
    space is checked for every trial of a sweep (engine/sweep.py)."""
    what = "sweep" if sweep else "run"
    output_problem = output_dir_problem(config.output_dir)
    base_problem = base_model_problem(config.base_model) if needs_base_model else None
    problems = [p for p in (output_problem, base_problem, upload_problem(config), *tracker_problems(config),
                            *launcher_problems(config)) if p]
    # The ledger last, and only when nothing else stops the run: opening a new one creates its file.
    problems = problems or [p for p in (ledger_problem(ledger),) if p]
    notes = []
    if check_disk and not output_problem and not base_problem:
        found, skipped = disk_space_problems(config, disk_stages, download=needs_base_model, sweep=sweep)
        problems += found
        if skipped:
            notes.append(f"disk space not checked: {skipped}; the {what} starts without knowing whether it fits")
    if problems:
        message = problems[0] if len(problems) == 1 else (
            f"{len(problems)} problems stop this {what}:\n" + "\n".join(f"  - {p}" for p in problems))
        raise PreflightError(message,
                             hint="nothing was recorded; fix the above and run the same command again")
    return notes


def launcher_problems(config: PipelineConfig) -> list[str]:
    """A stage on several nodes needs somewhere to meet: its rdzv_endpoint, or a Slurm allocation with
    a task per node (engine/stage_process.py starts it there with srun)."""
    import os

    from trainpipe.engine.stage_process import slurm_tasks

    problems = []
    for name in config.run_stages():
        launcher = getattr(getattr(config, name, None), "launcher", None)
        if launcher is None or launcher.nnodes <= 1 or launcher.rdzv_endpoint:
            continue
        tasks = slurm_tasks(dict(os.environ))
        if tasks < launcher.nnodes:
            where = f"this Slurm job has {tasks} task(s)" if tasks else "this is not a Slurm job"
            problems.append(f"{name}.launcher: nnodes is {launcher.nnodes} without an rdzv_endpoint, and {where}: "
                            f"set {name}.launcher.rdzv_endpoint=HOST:PORT (node 0's address) or run inside a "
                            f"Slurm allocation with a task per node (sbatch --nodes={launcher.nnodes} "
                            "--ntasks-per-node=1)")
    return problems


def output_dir_problem(output_dir: str) -> str | None:
    problem = dir_problem(output_dir)
    return f"output_dir '{output_dir}': {problem}" if problem else None


class SweepCopies(NamedTuple):
    """How many trials a sweep runs, and how many of them write each stage (the others reuse it)."""
    trials: int
    copies: dict[str, int]


def disk_space_problems(config: PipelineConfig, stages: list[str] | None = None, *, download: bool = True,
                        sweep: SweepCopies | None = None) -> tuple[list[str], str | None]:
    """(problems, why the check was skipped). A problem per filesystem with less free space than is
    estimated to go there (stages/footprint.py): output_dir's gets the stages' writes, the HF cache's
    the base model's download (`download`: a stage still to run loads it), one filesystem both."""
    import os

    from trainpipe.diskspace import existing_ancestor, free_bytes, human
    from trainpipe.stages.footprint import explain

    found, skipped = explain(config, stages, hub=download)
    if found is None:
        return [], skipped
    if sweep:
        found = found.per_trial(sweep.copies, sweep.trials)
    what = f"this sweep of {sweep.trials} trials" if sweep else "this run"
    output = existing_ancestor(config.output_dir)
    # filesystem -> (directories named, free, needs)
    places: dict[int, tuple[list[str], int, list[Any]]] = {}
    if found.stages:
        places[os.stat(output).st_dev] = ([f"output_dir '{config.output_dir}'"], free_bytes(output), list(found.stages))
    if download and found.download is not None and found.download.total:
        cache = existing_ancestor(found.download.where)
        dirs, free, needs = places.setdefault(os.stat(cache).st_dev, ([], free_bytes(cache), []))
        dirs.append(f"the HF cache '{found.download.where}'")
        needs.insert(0, found.download)
    problems = []
    for dirs, free, needs in places.values():
        total = sum(n.total for n in needs)
        if free >= total:
            continue
        writes = any(n is not found.download for n in needs)
        downloads = any(n is found.download for n in needs)
        fs = existing_ancestor(output if writes else found.download.where)
        where = f"{dirs[0]}: its filesystem" if len(dirs) == 1 else f"{' and '.join(dirs)}: their filesystem"
        verb = "download and write" if writes and downloads else "write" if writes else "download"
        fixes = []
        if writes:
            fixes.append("point output_dir at a larger disk, or save fewer checkpoints (a larger "
                         "checkpoint_every_n_steps)" + (", or sweep fewer trials" if sweep else ""))
        if downloads:
            fixes.append("point HF_HOME (or HF_HUB_CACHE) at a larger disk")
        problems.append(f"{where} ({fs}) has {human(free)} free, and {what} will {verb} about {human(total)} "
                        f"there: " + "; ".join(n.line() for n in needs)
                        + f". Free space, {', or '.join(fixes)}; `--force` starts anyway")
    return problems, None


def ledger_problem(ledger: Ledger) -> str | None:
    try:
        ledger.check_writable()
    except LedgerError as exc:
        return exc.message
    return None


def upload_problem(config: PipelineConfig) -> str | None:
    if not config.upload_to_hub:
        return None
    if not config.hub_repo_id or "/" not in config.hub_repo_id or not HUB_ID.match(config.hub_repo_id):
        return (f"hub_repo_id '{config.hub_repo_id or ''}': upload_to_hub is true and needs a repo id "
                "like 'your-name/model-name'")
    if not hub_token():
        return (f"upload_to_hub: uploading to '{config.hub_repo_id}' needs a Hub token with write access; "
                "set HF_TOKEN (read from the environment only, never stored)")
    return None


# report_to value -> the modules transformers can log through (any one of them will do).
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}


def tracker_problems(config: PipelineConfig) -> list[str]:
    """A tracker named in report_to that is not installed would only fail once training starts."""
    import importlib.util

    problems = []
    for stage in [name for name in ("sft", "dpo") if config.enabled(name)]:
        for tracker in getattr(config, stage).report_to:
            modules = TRACKER_MODULES.get(tracker, ())
            if modules and not any(importlib.util.find_spec(m) for m in modules):
                problems.append(f"{stage}.report_to: '{tracker}' needs the {' or '.join(modules)} package "
                                f"(pip install {modules[0]}), or remove it")
    return problems


def base_model_problem(name: str) -> str | None:
    """None when the base model will load: the built-in model, a local model directory, or a Hub id
    that is in the local cache or that the Hub confirms."""
    from trainpipe.stages.tiny_model import is_builtin

    if is_builtin(name):
        return _builtin_problem(name)
    local = Path(name).expanduser()
    if local.exists() or not HUB_ID.match(name):
        return _local_problem(name, local)
    return _hub_problem(name)


def _builtin_problem(name: str) -> str | None:
    from trainpipe.errors import ConfigError, TrainpipeError
    from trainpipe.stages.tiny_model import ensure_tiny_model

    try:
        ensure_tiny_model(name)
    except ConfigError as exc:
        return f"base_model: {exc.message}"
    except TrainpipeError as exc:
        return f"base_model '{name}': {exc.message}"
    return None


def _local_problem(name: str, path: Path) -> str | None:
    where = f"base_model '{name}'"
    if not path.exists():
        return f"{where}: no such directory (and not a Hub id like 'org/model')"
    if not path.is_dir():
        return f"{where}: is a file; point it at a model directory (config.json, *.safetensors, tokenizer)"
    return _model_dir_problem(where, path)


def _model_dir_problem(where: str, path: Path) -> str | None:
    config = path / "config.json"
    if not config.is_file():
        if (path / "adapter_config.json").is_file():
            return f"{where}: {path} is a LoRA adapter, not a full model; use its base model (or merge it first)"
        return f"{where}: no config.json in {path}; not a transformers model directory"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{where}: {config} cannot be read as JSON ({exc})"
    if not any(next(path.glob(pattern), None) for pattern in WEIGHTS):
        if next(path.glob("*.bin"), None) or next(path.glob("*.pt"), None):
            return (f"{where}: {path} has only PyTorch pickle weights (.bin/.pt); trainpipe loads safetensors "
                    "only (convert with model.save_pretrained(dir, safe_serialization=True))")
        return f"{where}: no weights in {path} (expected *.safetensors)"
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return f"{where}: no tokenizer in {path} (expected one of {', '.join(TOKENIZER_FILES)})"
    return None


def _hub_problem(repo_id: str) -> str | None:
    from huggingface_hub import constants, try_to_load_from_cache

    where = f"base_model '{repo_id}'"
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        snapshot = Path(cached).parent
        if _model_dir_problem(where, snapshot) is None:
            return None  # complete in the cache: loads with or without network
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        return (f"{where}: not in the local cache ({cache}) and HF_HUB_OFFLINE=1 forbids downloading it; "
                "set HF_HUB_OFFLINE=0 on a machine with network, or point base_model at a local directory")
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    from trainpipe.stages.hub_model import model_info

    try:
        # With every file's size: the disk estimate (stages/footprint.py) reads this same answer.
        info = model_info(repo_id)
    except GatedRepoError:
        return f"{where}: the repo is gated; accept its terms on the Hub and set HF_TOKEN"
    except RepositoryNotFoundError:
        return (f"{where}: no such model on the Hub and no local directory of that name "
                "(check the id; a private repo needs HF_TOKEN)")
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return f"{where}: not in the local cache ({cache}) and the Hub answered {status or exc}; try again later"
    except Exception as exc:  # noqa: BLE001 - any network failure means the same thing here
        return (f"{where}: not in the local cache ({cache}) and the Hub is unreachable "
                f"({type(exc).__name__}: {exc}); connect to the network, or download it where there is one "
                f"(`hf download {repo_id}`) and copy the cache, or point base_model at a local directory")
    if getattr(info, "gated", False) and not hub_token():
        return f"{where}: the repo is gated; accept its terms on the Hub and set HF_TOKEN"
    files = [s.rfilename for s in (info.siblings or [])]
    if files and not any(f.endswith(".safetensors") for f in files):
        return f"{where}: the Hub repo has no *.safetensors weights; trainpipe loads safetensors only"
    return None


def check_environment(ledger: Ledger, run: dict[str, Any], config: PipelineConfig, *,
                      force: bool) -> tuple[dict[str, Any], list[str]]:
    """Compare the environment a resume would run in with the one the run last ran in (its lineage,
    as updated by earlier resumes). Returns what the `resume` transition records and the notes to
    show; raises EnvironmentChanged, before any write, on a breaking difference without `force`."""
    run_id = run["run_id"]
    now = lineage.environment(config)
    if not run.get("lineage"):
        return ({"checked": False, "now": now},
                ["environment not checked: this run was created before trainpipe recorded lineage"])
    resumes = [t["detail"] for t in ledger.transitions(run_id) if t["stage"] is None and t["trigger"] == "resume"]
    pending = [s["name"] for s in ledger.stages(run_id) if s["state"] not in STAGE_DONE]
    diffs = lineage.compare(lineage.baseline(run["lineage"], resumes), now, pending)
    breaking = [d for d in diffs if d.breaking]
    minor = [d for d in diffs if not d.breaking]
    if breaking and not force:
        lines = [f"run {run_id} cannot be resumed as is: the environment changed in a way that breaks resuming it:",
                 *[f"  {d.line()}" for d in breaking]]
        if minor:
            lines += ["also changed (would not stop a resume):", *[f"  {d.line()}" for d in minor]]
        raise EnvironmentChanged("\n".join(lines),
                                 hint=f"nothing was recorded; restore the environment above, or resume anyway with "
                                      f"`trainpipe resume {run_id} --force` (the differences are recorded)")
    notes = []
    if breaking:
        notes.append("resumed with --force despite: " + "; ".join(d.line() for d in breaking))
    if minor:
        notes.append("environment changed since the run last ran (not breaking): "
                     + "; ".join(d.line() for d in minor))
    return {"checked": True, "forced": bool(breaking), "differences": [d.as_dict() for d in diffs], "now": now}, notes


def check_from_stage(config: PipelineConfig, from_stage: str | None, source: str) -> None:
    if from_stage is None:
        return
    if from_stage not in STAGE_ORDER:
        raise ConfigError(f"--from-stage {from_stage}: no such stage; use one of {', '.join(STAGE_ORDER)}")
    if not config.enabled(from_stage):
        raise ConfigError(f"--from-stage {from_stage}: stage '{from_stage}' is disabled in {source}")


def validate_inputs(config: PipelineConfig, observer: Observer | None = None) -> dict[str, dict[str, Any]]:
    """Every dataset row is checked before any model loads (and before the ledger is touched).
    Returns, per dataset role, its row count, format and how long the check took."""
    observer = observer or Observer()
    checked = {}
    for role in dataset_roles(config):
        source = getattr(config.datasets, role)
        observer.data_phase(role, "check", 0, None)
        checked[role] = validate(source, role, progress=lambda rows, role=role: observer.data_phase(
            role, "check", rows, None))
        observer.data_phase(role, "check", checked[role]["rows"], checked[role]["seconds"])
    return checked


def needs_base_model(ledger: Ledger, run_id: str, config: PipelineConfig) -> bool:
    """Whether a stage still to run loads the base model (a resume after SFT and merge passed does not)."""
    return any(config.enabled(s["name"]) and s["name"] != UPLOAD_STAGE
               and config.base_model in stage_inputs(ledger, run_id, config, s["name"]).values()
               for s in ledger.stages(run_id) if s["state"] not in STAGE_DONE)
