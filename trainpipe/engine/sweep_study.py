"""The Optuna side of a sweep: the search space as Optuna distributions, a study with the sweep's seeded
sampler (grid, random or TPE), and the comparison a replay uses to check that the sampler proposes
again exactly what the ledger recorded (sweep.py: the ledger is the only record of a study)."""

from __future__ import annotations

import math
from typing import Any

from trainpipe.config.sweepfile import Range, SweepSpec, trial_count


def space_distributions(spec: SweepSpec) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, values in spec.space.items():
        if isinstance(values, Range):
            if values.is_int:
                out[key] = IntDistribution(int(values.low), int(values.high), log=values.log,
                                           step=int(values.step or 1))
            else:
                out[key] = FloatDistribution(float(values.low), float(values.high), log=values.log,
                                             step=values.step)
        else:
            out[key] = CategoricalDistribution(values)
    return out


def new_study(spec: SweepSpec):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec.strategy == "grid":
        class _Grid(optuna.samplers.GridSampler):
            # GridSampler.after_trial calls study.stop() once the grid is exhausted, which raises
            # RuntimeError outside study.optimize(); ask-and-tell stops by itself after the last point.
            def after_trial(self, *args: Any, **kwargs: Any) -> None:
                pass

        sampler = _Grid({k: v for k, v in spec.space.items()}, seed=spec.seed)
    elif spec.strategy == "random":
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    else:
        # TPE samples at random until it has n_startup_trials results (10 by default): with a small
        # budget, model the space after half of it instead.
        startup = max(1, min(10, trial_count(spec) // 2))
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup)
    return optuna.create_study(direction=spec.objective.direction, sampler=sampler)


def same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, float) or isinstance(y, float):
            if not (isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isclose(x, y, rel_tol=1e-12)):
                return False
        elif x != y:
            return False
    return True
