"""trainpipe vs the plain TRL script on a Qwen2.5-0.5B-Instruct-shaped model (issue 19).

The model is built here from the published config of Qwen/Qwen2.5-0.5B-Instruct (the values below,
copied from its config.json) with random weights, saved in bf16 as sharded safetensors with an index,
and laid out in a Hugging Face cache under that Hub id, so both sides load it offline
(HF_HUB_OFFLINE=1) by id, as a user with a warm cache would. Nothing is downloaded: the real
tokenizer is not available offline, so the built-in tiny model's tokenizer (vocab 861, ids inside
the 151936-row embedding) stands in, with its special-token ids written into the config.

Both sides run the same short workload (`WORKLOAD`, plus any --set): a few steps, short sequences,
4 eval prompts. Reported: wall of each side; trainpipe's own overhead (wall minus the stages' work
and the gates: CLI, checks, hashing, ledger, process starts, exports) as a share of the plain
script's wall, also without the stage worker's imports (its .work/worker.log line), which the plain
script pays inside its wall too; with --rounds N, each round and the medians; each gate check's seconds; peak RSS of each side; disk written per stage. Then the
base-model identity (engine/identity.py) on the same model as a local folder: the cost of the
calls one run makes, hashed every time (before) and hashed once per process (after).

    python benchmarks/real_size.py [--rounds N] [--keep DIR] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from overhead import phases  # noqa: E402 - the same phase accounting as the quickstart benchmark

HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"
# https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/config.json
QWEN25_05B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
WORKLOAD = ["sft.max_steps=3", "dpo.max_steps=2", "sft.max_seq_length=64", "dpo.max_seq_length=64",
            "sft.batch_size=2", "dpo.batch_size=2", "sft.gradient_accumulation=1", "dpo.gradient_accumulation=1",
            "checkpoint_every_n_steps=1000", "merge.dtype=bfloat16", "dpo.save_merged=false",
            "stages.sft.timeout_minutes=120", "stages.merge.timeout_minutes=120", "stages.dpo.timeout_minutes=120",
            # random weights learn nothing in 3 steps: the gates run in full, their learning checks as warnings
            "validation.max_loss=50", "validation.min_accuracy=0", "validation.max_new_tokens=8",
            "validation.merge_prompts=2",
            "validation.checks.output_format_valid.severity=warn", "validation.checks.loss_went_down.severity=warn"]


def build_model(hf_home: Path) -> Path:
    """The snapshot directory of HUB_ID in an HF cache under hf_home, with random bf16 weights."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from trainpipe.stages.tiny_model import ASSET_DIR

    commit = hashlib.sha1(json.dumps(QWEN25_05B_INSTRUCT, sort_keys=True).encode()).hexdigest()
    repo = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    tokenizer_config = json.loads((ASSET_DIR / "config.json").read_text())
    ids = {k: tokenizer_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = Qwen2Config(**{**QWEN25_05B_INSTRUCT, **ids})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(snapshot, safe_serialization=True, max_shard_size="300MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(ASSET_DIR / name, snapshot / name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """(wall s, start time, peak RSS GB of the command's process tree as GNU time reports it, stdout)."""
    launched = time.time()
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    # GNU time's %M is the largest RSS of the command and the descendants it waited for; the stage
    # processes are reaped by the run's worker, so this is the largest single process, not the sum.
    peak_kb = max([int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB")] or [0])
    return wall, launched, peak_kb / 1e6, proc.stdout


def du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9 if path.exists() else 0.0


def gate_checks(db_url: str) -> list[tuple[str, str, float]]:
    conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    rows = conn.execute("SELECT g.stage, c.name, c.duration_s FROM gate_checks c JOIN gate_results g "
                        "ON c.gate_result_id = g.id ORDER BY g.id, c.id").fetchall()
    conn.close()
    return rows


def identity_cost(model_dir: Path) -> str:
    """base_model_identity on a local folder, in a fresh process: the first call hashes, the second
    (lineage.build then the run's fingerprints: two per run, three per resume) reuses it."""
    code = ("import time, json; from trainpipe.engine.identity import base_model_identity as b\n"
            f"t=time.perf_counter(); b({str(model_dir)!r}); first=time.perf_counter()-t\n"
            f"t=time.perf_counter(); b({str(model_dir)!r}); second=time.perf_counter()-t\n"
            "print(json.dumps([first, second]))")
    first, second = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True, cwd=ROOT).stdout)
    return (f"base_model_identity of the {du(model_dir):.2f} GB folder: first call {first:.2f} s, second "
            f"{second:.3f} s; per run (2 calls): before {2 * first:.2f} s, after {first + second:.2f} s")


def one_round(work: Path, sets: list[str], env: dict[str, str], *, plain_first: bool = False) -> dict:
    """trainpipe and the plain script once each on the same work; the figures main() prints."""
    def ours() -> tuple:
        wall, launched, rss, _ = measured([sys.executable, "-m", "trainpipe.cli.app", "run", "configs/quickstart.yaml",
                                           "--no-cache", *[a for s in [f"output_dir={work / 'tp'}", *sets]
                                                           for a in ("--set", s)]], round_env)
        return wall, rss, phases(round_env["TRAINPIPE_DB"], launched, launched + wall)

    def plain() -> tuple:
        wall, _, rss, stdout = measured([sys.executable, "benchmarks/plain_trl.py", str(work / "plain"), *sets], round_env)
        return wall, rss, next(json.loads(line) for line in stdout.splitlines() if "plain_phases" in line)

    work.mkdir(parents=True, exist_ok=True)
    # A ledger per round: phases() reads the newest run of it.
    round_env = {**env, "TRAINPIPE_DB": f"sqlite:///{work / 'ledger.db'}"}
    if plain_first:
        plain_wall, plain_rss, report = plain()
        wall, rss, phase = ours()
    else:
        wall, rss, phase = ours()
        plain_wall, plain_rss, report = plain()
    work_s = sum(s["stage work"] for s in phase["stages"].values())
    gates_s = sum(s["gate"] for s in phase["stages"].values())
    return {"wall": wall, "plain_wall": plain_wall, "work_s": work_s, "gates_s": gates_s,
            "own": wall - work_s - gates_s, "vs_plain": (wall - gates_s) / plain_wall - 1,
            "worker_imports": phase["worker imports"],
            "own_beyond_imports": wall - work_s - gates_s - phase["worker imports"],
            "start_s": sum(s["process start"] for s in phase["stages"].values()),
            "plain_work": float(sum(report["plain_phases"][s] for s in ("sft", "merge", "dpo"))),
            "plain_imports": float(report["plain_phases"]["imports"]), "rss": rss, "plain_rss": plain_rss,
            "loops": (phase["stages"]["sft"]["trainer loop"], phase["stages"]["dpo"]["trainer loop"]),
            "plain_loops": (report["train_runtime"]["sft"], report["train_runtime"]["dpo"]),
            "phase": phase, "plain_phases": report["plain_phases"], "run_dir": next((work / "tp").glob("quickstart-*")),
            "db": round_env["TRAINPIPE_DB"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two sides this many times; "
                        "report medians")
    args = parser.parse_args()
    print(f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="trainpipe-real-size-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        snapshot = build_model(work / "hf")
        print(f"built {HUB_ID}-shaped model in {time.perf_counter() - started:.1f} s: {du(snapshot):.2f} GB, "
              f"{len(list(snapshot.glob('*.safetensors')))} shards + index", flush=True)
        eval_file = work / "eval4.jsonl"
        eval_file.write_text("".join((ROOT / "examples/task_api/eval.jsonl").read_text().splitlines(True)[:4]))
        sets = [f"base_model={HUB_ID}", f"datasets.eval={eval_file}", *WORKLOAD, *args.sets]
        env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "TRAINPIPE_HOME": str(work / "home"),
               "TRAINPIPE_DB": f"sqlite:///{work / 'ledger.db'}", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("HF_HUB_CACHE", None)

        rounds = []
        for index in range(args.rounds):
            # Alternate which side goes first: the box's speed drifts by ~10% over minutes.
            rounds.append(one_round(work / f"round{index}", sets, env, plain_first=index % 2 == 1))
            r = rounds[-1]
            print(f"round {index + 1}{' (plain first)' if index % 2 else ''}: trainpipe {r['wall']:.1f} s "
                  f"(work {r['work_s']:.1f}, gates {r['gates_s']:.1f}, own {r['own']:.1f}, of which imports "
                  f"{r['worker_imports']:.1f}), plain {r['plain_wall']:.1f} s (imports {r['plain_imports']:.1f}); "
                  f"without gates {100 * r['vs_plain']:+.1f}%; trainer loops sft/dpo {r['loops'][0]:.1f}/{r['loops'][1]:.1f} "
                  f"vs {r['plain_loops'][0]:.1f}/{r['plain_loops'][1]:.1f} s", flush=True)
        r = rounds[-1] if len(rounds) == 1 else {k: (statistics.median(x[k] for x in rounds)
                                                     if isinstance(rounds[0][k], float) else rounds[-1][k])
                                                 for k in rounds[0]}
        if len(rounds) > 1:
            for key in ("loops", "plain_loops"):
                r[key] = tuple(statistics.median(x[key][i] for x in rounds) for i in range(2))
            print(f"\nmedians of {len(rounds)} rounds (peak RSS, phases, gate checks and disk: the last round):")
        wall, plain_wall, work_s, gates_s, own = r["wall"], r["plain_wall"], r["work_s"], r["gates_s"], r["own"]
        print(f"\n| | trainpipe | plain TRL |\n|---|---|---|\n| wall | {wall:.1f} s | {plain_wall:.1f} s |")
        print(f"| stages' work | {work_s:.1f} s | {r['plain_work']:.1f} s |")
        print(f"| gates | {gates_s:.1f} s | - |")
        print(f"| own overhead (wall - work - gates) | {own:.1f} s = **{100 * own / plain_wall:.1f}%** of plain | - |")
        # The plain script pays its imports inside its wall too; trainpipe pays them as the first stage
        # process's start. So the like-for-like comparison is the whole wall without the gates.
        print(f"| imports (trainpipe: stage process starts) | {r['start_s']:.1f} s | {r['plain_imports']:.1f} s |")
        # Any script pays the torch/transformers/trl imports; what trainpipe adds is the rest.
        print(f"| of which the worker's imports (worker.log) | {r['worker_imports']:.1f} s | - |")
        print(f"| own overhead beyond those imports | {r['own_beyond_imports']:.1f} s = "
              f"**{100 * r['own_beyond_imports'] / plain_wall:.1f}%** of plain | - |")
        print(f"| wall without the gates | {wall - gates_s:.1f} s = **{100 * r['vs_plain']:+.1f}%** "
              f"against plain | {plain_wall:.1f} s |")
        print(f"| peak RSS (largest process) | {r['rss']:.2f} GB | {r['plain_rss']:.2f} GB |")
        print(f"| trainer loop sft/dpo | {r['loops'][0]:.1f} / {r['loops'][1]:.1f} s | {r['plain_loops'][0]:.1f} / "
              f"{r['plain_loops'][1]:.1f} s |")
        phase, run_dir = rounds[-1]["phase"], rounds[-1]["run_dir"]
        print(f"\nphases: {json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in phase.items() if k != 'stages'})}")
        for stage, values in phase["stages"].items():
            print(f"  {stage}: " + ", ".join(f"{k} {v:.2f} s" for k, v in values.items()))
        print(f"  plain: {json.dumps(rounds[-1]['plain_phases'])}")
        print("\n| gate check | stage | seconds |\n|---|---|---|")
        for stage, name, seconds in gate_checks(rounds[-1]["db"]):
            print(f"| {name} | {stage} | {seconds:.2f} |")
        print("\n| disk written | GB |\n|---|---|")
        for label, path in (("sft adapter", run_dir / "sft"), ("sft checkpoints", run_dir / ".work/sft/checkpoints"),
                            ("merged (bf16)", run_dir / "merged"), ("dpo adapter", run_dir / "dpo"),
                            ("dpo checkpoints", run_dir / ".work/dpo/checkpoints"), ("whole run dir", run_dir)):
            print(f"| {label} | {du(path):.3f} |")
        print("\n" + identity_cost(snapshot))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
