"""What a new user meets around the commands (issue 32): bracketed text in help, a reader that goes
away early, `--version`. Each observed from the real CLI process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import QUICKSTART
from helpers import cli

from trainpipe.cli.app import app


def _help_texts(command) -> list[str]:
    texts = [command.help or ""]
    for param in command.params:
        texts.append(getattr(param, "help", None) or "")
    return texts


def _commands():
    import typer

    group = typer.main.get_command(app)
    return [("", group)] + sorted(group.commands.items())


@pytest.mark.parametrize("name", [name for name, _ in _commands()])
def test_help_shows_every_bracketed_text_it_was_given(name):
    """`[ui]`, `[:SPLIT]`, `(env ...)`: rich markup took bracketed words for style tags and dropped
    them ("pip install 'trainpipe'"). Every bracket of every help text must reach the screen."""
    command = dict(_commands())[name]
    brackets = {b for text in _help_texts(command) for b in re.findall(r"\[[^\]\s]*[^\]]*\]", text)}
    proc = subprocess.run([sys.executable, "-m", "trainpipe.cli.app", *([name] if name else []), "--help"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "300", "TERM": "dumb"})
    assert proc.returncode == 0, proc.stderr
    shown = re.sub(r"[\s│╭╮╰╯─]+", " ", proc.stdout)
    for bracket in brackets:
        assert re.sub(r"\s+", " ", bracket) in shown, f"{name or 'trainpipe'} --help lost {bracket!r}"
    if name == "ui":
        assert "pip install 'trainpipe[ui]'" in shown


@pytest.mark.parametrize("args", [["data", str(QUICKSTART)], ["status", "--all"], ["inspect", "--graph"],
                                  ["--version", "--verbose"]], ids=["data", "status", "graph", "version"])
def test_a_reader_that_goes_away_ends_the_command_quietly(args):
    """As `trainpipe data CONFIG | head -3`: the pipe's reading end is closed before the command writes."""
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "trainpipe.cli.app", *args], stdout=write,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "120"}, timeout=300)
    os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_version_and_the_facts_a_lineage_records():
    import importlib.metadata

    plain = cli("--version", check=True)
    assert plain.stdout == f"trainpipe {importlib.metadata.version('trainpipe')}\n"
    verbose = cli("--version", "--verbose", check=True, env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})
    lines = verbose.stdout.splitlines()
    for name in ("torch", "transformers", "trl", "peft", "datasets"):
        assert f"{name} {importlib.metadata.version(name)}" in lines
    assert "device cpu" in lines or any(line.startswith("device cuda") for line in lines)
    # torch's own dispatch choice, which the variable forces to the scalar kernel.
    assert "cpu kernel DEFAULT (ATEN_CPU_CAPABILITY=default)" in lines


@pytest.mark.parametrize("state", ["passed", "failed", "interrupted"])
def test_a_finished_stage_bar_shows_its_time_and_a_stopped_one_the_step_it_reached(state):
    """The bar as the terminal shows it (rich renders into a recording console): a stage that ended
    shows how long it ran, not 0:00:00; a failed or interrupted one keeps its step, never a full bar."""
    import time

    from rich.console import Console

    from trainpipe.cli.progress import ProgressObserver
    from trainpipe.cli.render import Renderer

    renderer = Renderer()
    renderer.out = Console(record=True, width=120, force_terminal=False)
    observer = ProgressObserver(renderer)
    observer.run_created("r-1", "/tmp/r-1")
    observer.stage_started("sft", 1, None)
    observer.stage_progress("sft", 80, 300, {"loss": 0.5})
    time.sleep(1.2)
    observer.stage_finished("sft", state, {}, None, None if state == "passed" else "stopped")
    observer.close()
    [bar] = [line for line in renderer.out.export_text().splitlines() if line.startswith(f"sft {state}")]
    assert bar.rstrip().endswith("0:00:01"), bar
    assert ("300/300" in bar) == (state == "passed") and ("80/300" in bar) == (state != "passed"), bar


@pytest.mark.slow
def test_the_demo_ends_with_next_commands_that_work_as_printed(tmp_path):
    """`trainpipe demo` keeps its ledger in its workdir: its last lines say how to look at the run,
    and each of those commands works as printed; `status` here, with no ledger of its own, says where
    the demo's runs are."""
    import shlex

    env = {k: v for k, v in os.environ.items() if k != "TRAINPIPE_DB"}  # as a new user has it
    trainpipe = [sys.executable, "-m", "trainpipe.cli.app"]
    demo = subprocess.run([*trainpipe, "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    run_id = re.search(r"^Run (\S+)", demo.stdout, re.MULTILINE).group(1)
    lines = demo.stdout.splitlines()
    start = lines.index("Next, with the demo's ledger:")
    commands = [shlex.split(line) for line in lines[start + 1:start + 4]]
    assert [c[:2] for c in commands] == [["trainpipe", "status"], ["trainpipe", "inspect"], ["trainpipe", "ui"]]
    for command in commands[:2]:
        proc = subprocess.run([*trainpipe, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0 and run_id in proc.stdout, proc.stdout + proc.stderr
    ui = subprocess.Popen([*trainpipe, *commands[2][1:], "--port", "0"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = re.search(r"(http://\S+?:\d+)/", ui.stdout.readline()).group(1)
        import urllib.request

        with urllib.request.urlopen(f"{url}/runs/{run_id}", timeout=30) as page:
            assert run_id in page.read().decode()
    finally:
        ui.terminate()
        ui.wait(timeout=30)

    status = subprocess.run([*trainpipe, "status"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert status.returncode == 0 and "No runs yet" in status.stdout, status.stdout + status.stderr
    hint = re.search(r"The demo's runs are in its own ledger: (trainpipe status .*)$", status.stdout, re.MULTILINE)
    assert hint, status.stdout
    shown = subprocess.run([*trainpipe, *shlex.split(hint.group(1))[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert shown.returncode == 0 and run_id in shown.stdout


@pytest.mark.parametrize("refusal", [["--set", "sft.lora_r=0"], ["--sft-dataset", "missing.jsonl"],
                                     ["--set", "base_model=/nonexistent/model"]],
                         ids=["config", "dataset", "preflight"])
def test_a_refused_run_writes_nothing_not_even_a_ledger(tmp_path, refusal):
    """A fresh TRAINPIPE_HOME and the default ledger: the refused run exits 2 and leaves no file and no
    directory (the ledger is opened on its first use, which a refused run never reaches)."""
    home = tmp_path / "fresh-home"
    env = {**{k: v for k, v in os.environ.items() if k != "TRAINPIPE_DB"}, "TRAINPIPE_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "trainpipe.cli.app", "run", str(QUICKSTART),
                           "--set", f"output_dir={tmp_path / 'out'}", *refusal], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not home.exists() and not (tmp_path / "out").exists()
