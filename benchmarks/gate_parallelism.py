"""Gate mechanics: do parallel checks overlap, and is a timed-out check stopped?

    python benchmarks/gate_parallelism.py

Runs two checks that each sleep 2 s, first as `parallel`, then the same two as `sequential` (the
baseline, same run), and one 30 s check with a 2 s timeout next to a quick one. Prints wall times
and the parallel/sequential ratio (ideal 0.5).
"""

from __future__ import annotations

import time
from pathlib import Path

from trainpipe.config import load_config
from trainpipe.validators import Check, GateContext, Outcome, run_gate

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def sleeps(seconds: float):
    def check(_ctx: GateContext) -> Outcome:
        time.sleep(seconds)
        return Outcome(True, value=seconds)
    return check


def timed(checks: list[Check], ctx: GateContext) -> tuple[float, object]:
    started = time.perf_counter()
    outcome = run_gate("bench", checks, ctx)
    return time.perf_counter() - started, outcome


def main() -> None:
    ctx = GateContext(stage="sft", output_path=None, metrics={}, log_history=[], config=load_config(QUICKSTART))
    parallel, _ = timed([Check("a", sleeps(2), mode="parallel"), Check("b", sleeps(2), mode="parallel")], ctx)
    sequential, _ = timed([Check("a", sleeps(2)), Check("b", sleeps(2))], ctx)
    stopped, outcome = timed([Check("slow", sleeps(30), mode="parallel", timeout_s=2),
                              Check("quick", sleeps(0.1), mode="parallel")], ctx)
    print(f"two 2 s checks, parallel:   {parallel:.2f} s")
    print(f"two 2 s checks, sequential: {sequential:.2f} s")
    print(f"ratio parallel/sequential:  {parallel / sequential:.2f} (ideal 0.50)")
    details = {c.name: c.details or "passed" for c in outcome.checks}
    print(f"30 s check with a 2 s timeout next to a quick one: gate took {stopped:.2f} s; {details}")


if __name__ == "__main__":
    main()
