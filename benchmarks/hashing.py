"""Hashing a stage's output: `checkpoints.hash_tree` on one thread vs its default (threads per core,
at most 8), on the same files in the same invocation.

trainpipe records a sha256 for every file a stage writes (the ledger's artifacts, checkpoint
manifests, `trainpipe verify`). For a merged model that is the model's size: 1 GB at 0.5B in bf16,
~140 GB at 70B. By default the files are random bytes laid out like a sharded model (`--shards` files
of `--shard-mb` MB); `--dir` hashes an existing folder instead (a real merged model). Each side runs
`--repeat` times, alternating; the page cache is warm after the first read, as it is when the
orchestrator hashes files a stage has just written.

    python benchmarks/hashing.py [--shards 4] [--shard-mb 256] [--repeat 3] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainpipe.checkpoints import hash_tree  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trainpipe-bench-hash-") as tmp:
        root = args.dir or Path(tmp)
        if args.dir is None:
            for index in range(args.shards):
                with (root / f"model-{index + 1:05d}-of-{args.shards:05d}.safetensors").open("wb") as handle:
                    for _ in range(args.shard_mb):
                        handle.write(os.urandom(1 << 20))
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        hash_tree(root, threads=1)  # warm the page cache
        times: dict[str, list[float]] = {"1 thread": [], "default": []}
        results = {}
        for _ in range(args.repeat):
            for side, threads in (("1 thread", 1), ("default", None)):
                started = time.perf_counter()
                results[side] = hash_tree(root, threads=threads)
                times[side].append(time.perf_counter() - started)
        if results["1 thread"] != results["default"]:
            sys.exit("the two sides computed different hashes")
        cores = len(os.sched_getaffinity(0))
        print(f"{len(results['default'])} files, {size / 1e9:.2f} GB, {cores} cores; medians of {args.repeat}:")
        base = statistics.median(times["1 thread"])
        for side, values in times.items():
            median = statistics.median(values)
            print(f"  {side}: {median:.2f} s ({size / 1e9 / median:.2f} GB/s), {median / base:.2f}x of 1 thread")


if __name__ == "__main__":
    main()
