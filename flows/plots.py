"""Figures people would rather look at than read: learning, adaptation, trajectories."""

from __future__ import annotations

import itertools
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from maml_core.episodes import Episodes

PAPER_RETURNS = Path(__file__).resolve().parent.parent / "data" / "maml_paper_rl_returns.csv"


def paper_rows(family: str, path: Path = PAPER_RETURNS) -> pd.DataFrame:
    """The MAML paper's returns for ``family`` (empty if the paper does not cover it)."""
    if not path.is_file():
        return pd.DataFrame(columns=["task_family", "method", "gradient_steps", "mean_return",
                                    "ci95", "n_tasks", "note"])
    table = pd.read_csv(path)
    return table[table["task_family"] == family].reset_index(drop=True)


def learning_curve(history: pd.DataFrame, title: str, selected: int | None = None,
                   evaluations: pd.DataFrame | None = None, paper: float | None = None):
    """Pre- and post-adaptation return (or MSE) per meta-iteration; with model selection, the
    validation scores (``val_score``, RL) as points and the selected iteration as a line.
    RL only: ``evaluations`` (``report.evaluation_history``'s table) adds the held-out return
    after one step at each meta-iteration evaluated at, and ``paper`` the paper's as a line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label in (("pre_return", "before adaptation"), ("post_return", "after adaptation"),
                       ("pre_mse", "before adaptation"), ("post_mse", "after adaptation")):
        if col in history:
            ax.plot(history["iteration"], history[col], label=label)
    if "val_score" in history and "post_return" in history:
        points = history.dropna(subset=["val_score"])
        ax.plot(points["iteration"], points["val_score"], "o", ms=4, color="tab:green",
                label="validation score")
    rl = "post_return" in history
    if rl and evaluations is not None and "step_1" in evaluations and len(evaluations):
        ax.plot(evaluations["iteration"], evaluations["step_1"], "s", ms=4, color="tab:red",
                label="held-out, after 1 step")
    if rl and paper is not None:
        ax.axhline(paper, color="tab:red", ls=":", lw=1.2, label="paper, after 1 step")
    if selected is not None:
        ax.axvline(selected, color="tab:gray", ls="--", lw=1,
                   label=f"selected model (iteration {selected})")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("MSE" if "post_mse" in history else "mean return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def resources(history: pd.DataFrame, title: str):
    """Where a run's time and memory went, per meta-iteration: above, the seconds of each stage
    (``seconds_<stage>`` columns, stacked) under the whole iteration's; below, the process's
    resident memory after the meta-update (``memory_resident_mb``), with the iterations where a
    release ran marked (``memory_trimmed``; in runs older than that metric, those whose release
    handed memory back, ``memory_released_mb`` > 0), and the peak during each meta-iteration
    (``memory_peak_mb``) and each held-out evaluation (``memory_peak_evaluate_mb``) where
    recorded. None when the history has neither."""
    stages = [c for c in history.columns
              if c.startswith("seconds_") and c != "seconds_iteration"]
    whole = "seconds_iteration" in history
    memory = "memory_resident_mb" in history
    if not stages and not whole and not memory:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                      height_ratios=(3, 2))
    x = history["iteration"]
    if stages:
        top.stackplot(x, [history[c].fillna(0.0) for c in stages],
                      labels=[c.removeprefix("seconds_").replace("_", " ") for c in stages],
                      alpha=0.8)
    if whole:
        top.plot(x, history["seconds_iteration"], color="black", lw=0.8,
                 label="whole iteration")
    top.set_ylabel("seconds")
    top.set_title(title)
    top.grid(alpha=0.3)
    if stages or whole:
        top.legend(fontsize="small", ncol=2)
    if memory:
        gb = history["memory_resident_mb"] / 1024
        if "memory_peak_mb" in history:
            bottom.plot(x, history["memory_peak_mb"] / 1024, color="tab:gray", lw=0.8,
                        label="peak during the meta-iteration")
        if "memory_peak_evaluate_mb" in history:
            held = history["memory_peak_evaluate_mb"].notna()
            bottom.plot(x[held], history.loc[held, "memory_peak_evaluate_mb"] / 1024, "o",
                        color="tab:olive", ms=4, label="peak during a held-out evaluation")
        bottom.plot(x, gb, color="tab:purple", label="resident memory after the meta-update")
        column = "memory_trimmed" if "memory_trimmed" in history else "memory_released_mb"
        ran = history.get(column, pd.Series(0.0, index=history.index)).fillna(0.0) > 0
        if ran.any():
            bottom.plot(x[ran], gb[ran], "v", color="tab:red", ms=5,
                        label="release ran (malloc_trim)")
        bottom.legend(fontsize="small")
    else:
        bottom.text(0.5, 0.5, "no memory figures recorded", ha="center", va="center",
                    transform=bottom.transAxes)
    bottom.set_ylabel("GB")
    bottom.set_xlabel("meta-iteration")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# One colour per method, shared by our curve and the paper's (labels "ours: maml", "paper: maml").
METHOD_COLORS = {"maml": "tab:blue", "pretrained": "tab:orange", "random": "tab:green",
                 "oracle": "tab:red"}


# For curves of no known method (a second MAML run of a family: "ours: maml (<config>)").
EXTRA_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def _method_color(label: str) -> str | None:
    return METHOD_COLORS.get(label.split(": ", 1)[-1])


def adaptation_curve(summary: pd.DataFrame, family: str, title: str,
                     others: dict[str, pd.DataFrame] | None = None, label: str = "ours"):
    """Mean return (95% CI) after 0..k steps, ours (``summary`` as ``label``, then ``others``
    by label) next to the paper's rows for ``family``. Supervised summaries plot the MSE."""
    value = "mean_return" if "mean_return" in summary else "mean_mse"
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = {label: summary, **(others or {})}
    extra = itertools.cycle(EXTRA_COLORS)
    for name, table in curves.items():
        ax.errorbar(table["step"], table[value], yerr=table["ci95"], marker="o", capsize=3,
                    label=textwrap.shorten(name, 60, placeholder=" …)"),
                    color=_method_color(name) or next(extra))
    if value == "mean_return":
        paper = paper_rows(family)
        for method, rows in paper.groupby("method"):
            name = f"paper: {method}"
            ax.errorbar(rows["gradient_steps"], rows["mean_return"], yerr=rows["ci95"],
                        marker="x", linestyle="--", alpha=0.6, capsize=2, label=name,
                        color=_method_color(name))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("adaptation steps")
    ax.set_ylabel("mean return" if value == "mean_return" else "MSE")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def per_task_returns(panels: dict[str, pd.DataFrame], coordinate: str, title: str,
                     value: str = "return"):
    """Per held-out task, its return after each adaptation step against one number that
    describes the task (``coordinate``, e.g. the target velocity): one panel per run
    (``panels``: label -> table of ``coordinate``, ``step``, ``value``), sharing the y axis.
    Shows where adaptation reaches and where it falls short. Few distinct coordinates (e.g. a
    direction of +-1) are drawn as points spread per step; many as one line per step."""
    n = len(panels)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), sharey=True,
                             squeeze=False)
    for ax, (label, table) in zip(axes.flat, panels.items(), strict=False):
        steps = sorted(table["step"].unique())
        xs = table[coordinate]
        discrete = xs.nunique() <= 5
        spread = 0.04 * ((xs.max() - xs.min()) or 1.0)
        cmap = plt.get_cmap("viridis")
        for i, step in enumerate(steps):
            at_step = table[table["step"] == step].sort_values(coordinate)
            color = cmap(i / max(len(steps) - 1, 1))
            if discrete:
                ax.plot(at_step[coordinate] + (i - (len(steps) - 1) / 2) * spread, at_step[value],
                        "o", ms=3, alpha=0.7, color=color, label=f"step {step}")
            else:
                ax.plot(at_step[coordinate], at_step[value], "-o", ms=2.5, lw=1, alpha=0.85,
                        color=color, label=f"step {step}")
        ax.set_title(textwrap.shorten(label, 55, placeholder=" …)"), fontsize=9)
        ax.set_xlabel(coordinate)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(value)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def navigation_trajectories(tasks: pd.DataFrame, before: Episodes, after: Episodes,
                            max_tasks: int = 4):
    """Paths of the point before and after one adaptation step, with each task's goal."""
    n = min(max_tasks, before.num_tasks)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for i in range(n):
        ax = axes[0, i]
        for eps, color, label in ((before, "tab:blue", "before"), (after, "tab:orange",
                                                                     "after")):
            obs = eps.observations[:, i].cpu().numpy()  # [T, E, 2]
            mask = eps.masks[:, i].cpu().numpy()
            for e in range(min(3, obs.shape[1])):
                valid = mask[:, e] > 0
                ax.plot(obs[valid, e, 0], obs[valid, e, 1], color=color, alpha=0.7,
                        label=label if e == 0 else None)
        ax.plot(tasks["goal_x"].iloc[i], tasks["goal_y"].iloc[i], "r*", markersize=12,
                label="goal")
        ax.plot(0, 0, "ko", markersize=4)
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
        ax.set_title(f"task {int(tasks['task_id'].iloc[i])}")
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
