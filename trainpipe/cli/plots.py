"""`trainpipe inspect RUN_ID --plot FILE.png`: a run's curves drawn with matplotlib (optional:
`pip install trainpipe[plots]`). One panel per stage that logged a training loss, plus DPO's reward
margins and accuracies on the DPO panel's second axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainpipe.errors import ConfigError


def plot_run(report: dict[str, Any], path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed, none opened
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib", hint="pip install 'trainpipe[plots]' (or matplotlib); "
                          "without --plot, inspect shows each curve as a sparkline") from None
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--plot {path}: give a .png, .svg or .pdf file name")
    if not path.parent.is_dir():
        raise ConfigError(f"--plot {path}: directory {path.parent} does not exist")
    stages = [s for s in report["stages"] if s.get("curves", {}).get("loss")]
    if not stages:
        raise ConfigError(f"run {report['run_id']} has no logged training loss to plot yet")
    figure, axes = plt.subplots(len(stages), 1, figsize=(8, 3 * len(stages)), squeeze=False)
    for axis, stage in zip(axes[:, 0], stages):
        steps, losses = zip(*stage["curves"]["loss"])
        axis.plot(steps, losses, color="tab:blue", label="loss")
        axis.set_title(f"{stage['name']} ({stage['state']})")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        extra = [(name, stage["curves"][name]) for name in ("rewards/margins", "rewards/accuracies")
                 if stage["curves"].get(name)]
        if extra:
            twin = axis.twinx()
            for (name, points), color in zip(extra, ("tab:orange", "tab:green")):
                twin.plot(*zip(*points), color=color, label=name)
            twin.set_ylabel("reward margin / accuracy")
            twin.legend(loc="upper right")
        axis.legend(loc="upper left")
    figure.suptitle(f"{report['run_id']}")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
