"""PNG charts of simulation results (matplotlib is an optional extra: `pip install .[plot]`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .engine import Result

MISSING = "--plot needs matplotlib: pip install 'celery-worker-operator[plot]'"


def can_plot() -> bool:
    """Whether matplotlib is installed: checked before a run, so a missing extra costs no wait."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_results(results: list[Result], path: Path) -> None:
    """Queue depth, oldest wait and replicas over time, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    for result in results:
        times = [s.time / 60 for s in result.samples]
        axes[0].plot(times, [s.depth for s in result.samples], label=result.scaler)
        axes[1].plot(times, [s.oldest_age for s in result.samples], label=result.scaler)
        axes[2].step(times, [s.replicas for s in result.samples], where="post", label=result.scaler)
    axes[1].axhline(results[0].target_wait, color="grey", linestyle="--", label="target wait")
    for axis, label in zip(axes, ("waiting tasks", "oldest wait (s)", "replicas"), strict=True):
        axis.set_ylabel(label)
        axis.legend(loc="upper right")
    axes[2].set_xlabel("minutes")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
