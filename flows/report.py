"""``maml report``: our MLflow runs beside the paper's numbers, as Markdown with PNG plots.

Which runs: per task family, MAML is the latest FINISHED run tagged ``maml.kind=meta-train``
and each baseline (pretrained, random, oracle) the latest FINISHED run tagged
``maml.kind=baseline`` with that ``maml.method``; supervised families (sinusoid) keep one run
per method and K (the run's ``k_shot`` param). Runs given with ``--run`` take their place
(whatever their status), the others are still picked as above. A second run of a family and
method given with ``--run`` is shown beside the first as ``<method> (<config>)``, e.g. our best
config next to the paper's protocol, or a baseline adapted with another step size. Our numbers
come from each run's ``evaluation/summary.csv`` artifact (mean and 95% CI over the held-out
tasks per adaptation step), the paper's from ``data/maml_paper_rl_returns.csv``.

A ``--run`` may also be a folder written by ``maml export`` (``flows.runrecord``): the run's
record as plain files, committed beside a report so that the report can be remade from any
checkout. Given only such folders, the report reads nothing from the MLflow store.

A meta-train run evaluated on the held-out tasks during training (``evaluation.every``)
gets a table of those evaluations: the mean after each step at each meta-iteration evaluated
at, with the training time and env steps spent before it (``evaluation_history``).

Where a family describes each task by one number (``TaskFamily.task_coordinate``: the target
velocity, the direction, navigation2d's goal distance), a per-task plot lays each run's
``evaluation/per_task.csv`` out along it. The held-out tasks behind it are rebuilt from the
run's ``config.yaml`` and used only if they have the digest of the evaluation dataset the run
logged; a run whose tasks cannot be rebuilt is left out of the plot, and the report says why.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from flows import plots, tracking
from flows.errors import UsageError
from flows.runrecord import (
    MODEL_DIR,
    ExportedRecord,
    RunRecord,
    exports_only,
    held_out_task_table,
    is_export,
    open_record,
)
from maml_core.config import MAMLConfig
from maml_core.tasks.base import TASK_ID, get_task_family

KINDS = ("meta-train", "baseline")
METHODS = ("maml", "pretrained", "random", "oracle")
SUPERVISED_STEPS = (1, 10)  # the paper's sinusoid comparison: MSE after 1 and 10 steps
CURVE_KEYS = ("pre_return", "post_return", "pre_mse", "post_mse", "val_score")
EVAL_KEY = re.compile(r"eval_(return|mse)_step_(\d+)")  # tracking.eval_metrics' names
MISSING = "—"
NO_COMMAND = ("not recorded (started outside the `maml` command line, or before it recorded "
              "commands)")


@dataclass
class ReportRun:
    """One run in the report (from the MLflow store or an export) and what it stands for."""

    run: RunRecord  # an mlflow.entities.Run is wrapped
    family: str
    method: str
    k_shot: int | None  # supervised families only
    summary: pd.DataFrame

    def __post_init__(self):
        self.run = open_record(self.run)

    @property
    def id(self) -> str:
        return self.run.info.run_id

    @property
    def base_method(self) -> str:
        """The method without its variant: ``maml`` for ``maml (<config>)``."""
        return self.method.split(" ")[0]

    @property
    def label(self) -> str:
        return self.method if self.k_shot is None else f"{self.method} K={self.k_shot}"

    @property
    def command(self) -> str | None:
        return self.run.data.tags.get(tracking.TAG_COMMAND)

    @property
    def resumes(self) -> list[tuple[int, int, str | None]]:
        return tracking.resumes(self.run.data.tags)


def _supervised(family: str) -> bool:
    from maml_core.tasks import get_task_family

    try:
        return get_task_family(family).kind == "supervised"
    except Exception:  # a family registered outside this process: judged by its tables
        return False


def _method(run) -> str:
    tags = run.data.tags
    return "maml" if tags.get("maml.kind") == "meta-train" else tags.get("maml.method", "?")


_FAMILY_TAG = "maml.task_family"  # set by `maml train` and `maml baseline`


def _words(command: str | None) -> list[str]:
    try:
        return shlex.split(command or "")
    except ValueError:
        return []


def _overrides(words: list[str]) -> list[str]:
    """The ``--set`` overrides of a command line, in order."""
    return ([value for flag, value in itertools.pairwise(words) if flag == "--set"]
            + [w.split("=", 1)[1] for w in words if w.startswith("--set=")])


def _resume_overrides(run) -> list[str]:
    """The ``--set`` overrides of the run's resumes, oldest first (the run's params keep the
    values its first segment was logged with)."""
    return [o for _, _, command in tracking.resumes(run.data.tags)
            for o in _overrides(_words(command))]


def _command_parts(run) -> list[str]:
    """The config file's stem, the ``--set`` overrides and the
    ``--pretrain-iterations``/``--init-model`` of the run's recorded command, where a resume
    with ``--set`` replaces the value of a key its run set (``--set iterations=240``) or adds
    the key: what the run's last iterations ran with."""
    words = _words(run.data.tags.get(tracking.TAG_COMMAND))
    settings = {o.split("=", 1)[0]: o for o in [*_overrides(words), *_resume_overrides(run)]}
    parts = [Path(w).stem for w in words if w.endswith((".yaml", ".yml"))][:1]
    parts += list(settings.values())
    parts += [f"{flag[2:]}={value}" + (_other_family(value, run) if flag == "--init-model"
                                         else "")
              for flag, value in itertools.pairwise(words)
              if flag in ("--pretrain-iterations", "--init-model")]
    return parts


def _other_family(init_model: str, run) -> str:
    """`` (an ant-dir model)`` where ``init_model`` is an exported run (its folder or its
    ``model/``) of another task family than ``run``'s: a warm start across families, which
    the path alone does not tell; empty otherwise."""
    folder = Path(init_model)
    folder = folder.parent if folder.name == MODEL_DIR else folder
    if not is_export(folder):
        return ""
    try:
        family = ExportedRecord(folder).data.tags.get(_FAMILY_TAG)
    except UsageError:
        return ""
    if not family or family == run.data.tags.get(_FAMILY_TAG):
        return ""
    return f" ({'an' if family[0] in 'aeiou' else 'a'} {family} model)"


def _variant(run, method: str) -> str:
    """``<method> (<config>)``: :func:`_command_parts` (the run id's start where the run
    recorded no command)."""
    return f"{method} ({', '.join(_command_parts(run)) or run.info.run_id[:8]})"


# Params that do not change what a run learns: left out when runs are compared across seeds.
_BOOKKEEPING = ("seed", "checkpoint_every", "pipeline.")
_TASK_OPTIONS = "task.options."  # the params of a family's task options


def _last_params(run) -> dict[str, str]:
    """The run's params with its resumes' ``--set`` overrides laid over them: the config its
    last iterations ran with."""
    return {**run.data.params, **dict(o.split("=", 1) for o in _resume_overrides(run)
                                      if "=" in o)}


def _setting(value: str) -> Any:
    """A param or ``--set`` value as what it means, so that the ways of writing one value
    compare equal: ``1e-2``, ``0.01`` and ``1.0e-2`` are one number (YAML 1.1 reads ``1e-2``
    as a string, which a free-form task option keeps), ``100`` and ``100.0`` one count, ``True``
    and ``true`` one boolean."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, bool):
        return parsed
    try:
        return float(parsed) if isinstance(parsed, (str, int, float)) else parsed
    except ValueError:
        return parsed


@functools.cache
def _default_params() -> dict[str, Any]:
    """Today's config defaults as params' values (``inner.step_size_min``: None, ...)."""
    return {k: _setting(v) for k, v in tracking.flatten_config(MAMLConfig()).items()}


def _same_but_seed(a, b) -> bool:
    """Whether two runs' resolved configs (their MLflow params, with their resumes'
    overrides laid over them) agree on every key both have, as values rather than as written,
    the seed and bookkeeping aside; a key that only one has was added to the config after
    the other run, which therefore ran with its default: the one that has it must hold the
    default too. And whether they name the same task options (a config holds only the
    options it sets, so an option that one run names and the other does not makes another
    task, not a newer config)."""
    pa, pb = ({k: _setting(v) for k, v in _last_params(r).items()} for r in (a, b))
    defaults = _default_params()
    compared = (pa.keys() & pb.keys()) | ((pa.keys() ^ pb.keys()) & defaults.keys())
    return ({k for k in pa if k.startswith(_TASK_OPTIONS)}
            == {k for k in pb if k.startswith(_TASK_OPTIONS)}
            and all(pa.get(k, defaults.get(k)) == pb.get(k, defaults.get(k))
                    for k in compared if not k.startswith(_BOOKKEEPING)))


def seed_groups(runs: list[ReportRun]) -> list[list[ReportRun]]:
    """Runs of one method whose configs differ only in the seed, two or more to a group,
    each group in order of seed."""
    groups: list[list[ReportRun]] = []
    for r in runs:
        group = next((g for g in groups if g[0].base_method == r.base_method
                      and _same_but_seed(g[0].run, r.run)), None)
        if group is None:
            groups.append([r])
        else:
            group.append(r)
    key = lambda r: int(r.run.data.params.get("seed", "0"))  # noqa: E731
    return [sorted(g, key=key) for g in groups if len(g) > 1]


def _slot(run) -> tuple[str, str, int | None]:
    family = run.data.tags.get(_FAMILY_TAG, "?")
    k = run.data.params.get("k_shot")
    k_shot = int(k) if _supervised(family) and k is not None and k.isdigit() else None
    return family, _method(run), k_shot


def _report_run(run, slot: tuple[str, str, int | None] | None = None) -> ReportRun:
    run = open_record(run)
    family, method, k_shot = slot or _slot(run)
    return ReportRun(run, family, method, k_shot, run.table("evaluation/summary.csv"))


def select_runs(families: list[str] | None = None, run_ids: list[str] | None = None
                ) -> tuple[dict[tuple, ReportRun], list[str], str]:
    """The runs of the report by (family, method, K), notes on runs passed over, and where
    they were read from (for the report's first line).
    ``run_ids`` are MLflow run ids or folders of exported runs (``maml export``); where all of
    them are exports, the MLflow store is not read at all."""
    chosen: dict[tuple, ReportRun] = {}
    notes: list[str] = []
    given: dict[str, str] = {}  # run id -> how it was given
    for ref in dict.fromkeys(run_ids or []):
        run = open_record(ref)
        if run.info.run_id in given:  # a run given twice (by id, or as its export) shows once
            continue
        given[run.info.run_id] = str(ref)
        kind = run.data.tags.get("maml.kind")
        if kind not in KINDS:
            raise UsageError(f"--run {ref}: a {kind or 'untagged'} run (tag maml.kind); the "
                             "report takes meta-train and baseline runs")
        slot = _slot(run)
        if families and slot[0] not in families:
            raise UsageError(f"--run {ref} is a {slot[0]} run, but --family asks for "
                             f"{', '.join(families)} only; add --family {slot[0]}")
        if slot in chosen:  # a second run of a family and method: a variant beside the first
            slot = (slot[0], _variant(run, slot[1]), slot[2])
        if slot in chosen:
            raise UsageError(f"--run {given[chosen[slot].id]} and --run {ref} are both the "
                             f"{slot[1]} run of {slot[0]}; give one of them")
        chosen[slot] = _report_run(run, slot)
    sources = [] if exports_only(run_ids) else [_pick_latest(chosen, notes, families)]
    exports = sorted({_code(str(r.run.folder.parent)) for r in chosen.values()
                      if isinstance(r.run, ExportedRecord)})
    if exports:
        sources.append(f"exported runs under {', '.join(exports)}")
    where = " and ".join(sources)
    if not chosen:
        raise UsageError(f"no FINISHED meta-train or baseline runs"
                         f"{' of ' + ', '.join(families) if families else ''} in {where}; "
                         "make them first, e.g. `maml train configs/navigation2d.yaml` and "
                         "`maml baseline configs/navigation2d.yaml --method pretrained`")
    missing = [f for f in families or [] if not any(s[0] == f for s in chosen)]
    if missing:
        raise UsageError(f"no FINISHED meta-train or baseline runs of {', '.join(missing)} in "
                         f"{where}; leave out --family {missing[0]} or make runs for it first")
    return chosen, notes, where


def _pick_latest(chosen: dict[tuple, ReportRun], notes: list[str],
                 families: list[str] | None) -> str:
    """Fill the slots not given with the store's latest FINISHED run of each; returns where
    it looked, for messages."""
    candidates = [run for kind in KINDS for run in tracking.search_runs(
        f"attributes.status = 'FINISHED' and tags.`maml.kind` = '{kind}'")]
    candidates.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    for run in candidates:
        slot = _slot(run)
        if slot in chosen or (families and slot[0] not in families):
            continue
        try:
            chosen[slot] = _report_run(run)
        except tracking.TrackingError as exc:  # e.g. a run finished before its tables
            notes.append(f"run {run.info.run_id} ({slot[1]}, {slot[0]}) passed over: {exc}")
    cfg = tracking.active_config()
    return f"MLflow experiment `{cfg.experiment_name}` at `{cfg.tracking_uri}`"


# ------------------------------------------------------------------------------- numbers
def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return MISSING
    return f"{float(value):.{digits}f}"


def _row_at(table: pd.DataFrame, column: str, value: Any) -> pd.Series | None:
    rows = table[table[column] == value]
    return None if rows.empty else rows.iloc[0]


def _seconds(report_run: ReportRun) -> float | None:
    """Run end − start; for a resumed run, the sum over its segments (the first from the run's
    start, each later one from its resume), each ending at the last metric it recorded or, for
    the last one, at the run's end: the time between a stop and its resume is not counted."""
    info = report_run.run.info
    if not (info.end_time and info.start_time):
        return None
    starts = [info.start_time] + [1000 * ts for ts, _, _ in report_run.resumes]
    recorded = report_run.run.timestamps("seconds_iteration") if len(starts) > 1 else []
    ends = [max((t for t in recorded if start <= t < following), default=start)
            for start, following in itertools.pairwise(starts)] + [info.end_time]
    return sum(max(end - start, 0) for start, end in zip(starts, ends, strict=True)) / 1000.0


def cost(report_run: ReportRun) -> dict[str, float | None]:
    """Wall-clock time of the run, its training time (sum of ``seconds_iteration``; baselines:
    ``train_seconds``) and the environment steps it took (sum of ``env_steps``)."""
    history = report_run.run.history(["seconds_iteration", "env_steps"])
    train = report_run.run.data.metrics.get("train_seconds")
    if train is None and "seconds_iteration" in history:
        train = float(history["seconds_iteration"].sum())
    steps = float(history["env_steps"].sum()) if "env_steps" in history else None
    return {"wall_seconds": _seconds(report_run), "train_seconds": train,
            "env_steps": steps}


def evaluation_history(report_run: ReportRun) -> pd.DataFrame:
    """The held-out evaluations a meta-train run recorded as it trained (every
    ``evaluation.every`` meta-iterations, and the last one): one row per meta-iteration
    evaluated at, with the mean return (or MSE) after each adaptation step (columns
    ``step_K``), and the training time (sum of ``seconds_iteration``) and env steps (sum of
    ``env_steps``) of the meta-iterations before it (NaN where none was recorded). Empty if the
    run recorded none. An evaluation whose every value is NaN cannot be told from none and is
    left out."""
    found = sorted((int(m[2]), k) for k in report_run.run.data.metrics
                    if (m := EVAL_KEY.fullmatch(k)))
    if not found:
        return pd.DataFrame()
    keys = [k for _, k in found]
    history = report_run.run.history([*keys, "seconds_iteration", "env_steps"])
    if history.empty:
        return pd.DataFrame()
    evaluated = history.dropna(subset=keys, how="all")
    rows = []
    for row in evaluated.itertuples(index=False):
        before = history[history["iteration"] < row.iteration]
        rows.append({"iteration": int(row.iteration),
                     **{f"step_{step}": getattr(row, key) for step, key in found},
                     **{name: float(before[key].sum(min_count=1)) if key in before else None
                        for name, key in (("train_seconds", "seconds_iteration"),
                                          ("env_steps", "env_steps"))}})
    return pd.DataFrame(rows)


def rl_table(family: str, runs: dict[str, ReportRun]) -> pd.DataFrame:
    """Mean return and 95% CI per method and step: ours (NaN where no run) next to the
    paper's (NaN where the paper has no row)."""
    paper = plots.paper_rows(family)
    others = sorted(m for m in runs if m not in METHODS)
    methods = []
    for m in METHODS:  # each method, then its variants ("maml (<config>)", "random (...)")
        if m in runs or m in set(paper["method"]):
            methods.append(m)
        methods += [o for o in others if o.startswith(f"{m} (")]
    methods += [o for o in others if o not in methods]
    rows = []
    for method in methods:
        ours = runs[method].summary if method in runs else None
        theirs = paper[paper["method"] == method]
        steps = set(theirs["gradient_steps"].astype(int))
        if ours is not None:
            steps |= set(ours["step"].astype(int))
        for step in sorted(steps):
            o = _row_at(ours, "step", step) if ours is not None else None
            p = _row_at(theirs, "gradient_steps", step)
            rows.append({"method": method, "step": step,
                         "mean_return": None if o is None else float(o["mean_return"]),
                         "ci95": None if o is None else float(o["ci95"]),
                         "n_tasks": None if o is None else int(o["n_tasks"]),
                         "paper_mean_return": None if p is None else float(p["mean_return"]),
                         "paper_ci95": None if p is None else float(p["ci95"]),
                         "paper_n_tasks": None if p is None else int(p["n_tasks"])})
    return pd.DataFrame(rows)


def supervised_table(runs: list[ReportRun]) -> pd.DataFrame:
    """MSE (95% CI) after 1 and 10 steps, one row per (K, method)."""
    rows = []
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(runs, key=lambda r: (r.k_shot or 0, order.get(r.method, 99), r.method)):
        row: dict[str, Any] = {"k_shot": r.k_shot, "method": r.method}
        for step in SUPERVISED_STEPS:
            s = _row_at(r.summary, "step", step)
            row[f"mse_step_{step}"] = None if s is None else float(s["mean_mse"])
            row[f"ci95_step_{step}"] = None if s is None else float(s["ci95"])
        row["n_tasks"] = int(r.summary["n_tasks"].iloc[0])
        row["run_id"] = r.id
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------- markdown
def _code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _runs_list(runs: list[ReportRun]) -> list[str]:
    lines = ["MLflow runs used, and the command that made each:", ""]
    for r in runs:
        info, tags = r.run.info, r.run.data.tags
        started = (datetime.datetime.fromtimestamp(info.start_time / 1000, datetime.UTC)
                   .strftime("%Y-%m-%d %H:%M UTC") if info.start_time else "?")
        commit = (tags.get(tracking.TAG_GIT_COMMIT) or "unknown")[:10]
        export = f", read from {_code(str(r.run.folder))}" if isinstance(
            r.run, ExportedRecord) else ""
        lines.append(f"- {r.label}: run `{r.id}` ({info.run_name}, {info.status}, started "
                     f"{started}, git {commit}{export}): "
                     + (_code(r.command) if r.command else f"command {NO_COMMAND}"))
        if tags.get("maml.selected_iteration"):
            lines.append(f"  - its model is the one after iteration "
                         f"{tags['maml.selected_iteration']}, selected on validation tasks "
                         "(`evaluation.validation_tasks`; scores in "
                         "`evaluation/validation.csv`)")
        for _, iteration, command in r.resumes:
            lines.append(f"  - resumed at iteration {iteration}: "
                         + (_code(command) if command else f"command {NO_COMMAND}"))
    return [*lines, "", *_options_note(runs)]


def _task_options(run) -> dict[str, str]:
    return {k[len(_TASK_OPTIONS):]: v for k, v in run.data.params.items()
            if k.startswith(_TASK_OPTIONS)}


def _options_note(runs: list[ReportRun]) -> list[str]:
    """A warning when the runs of a section were made with different task options (e.g. the
    half-cheetah's frame_skip): their rows are then not results on the same problem."""
    options = {r.label: _task_options(r.run) for r in runs}
    if len({tuple(sorted(o.items())) for o in options.values()}) <= 1:
        return []
    listed = "; ".join(f"{label}: {', '.join(f'{k}={v}' for k, v in sorted(o.items()))}"
                       if o else f"{label}: the family's defaults"
                       for label, o in options.items())
    return [f"**These runs were made with different task options** ({listed}): compare rows "
            "made with the same options only.", ""]


def _cost_lines(runs: list[ReportRun]) -> list[str]:
    rows = []
    for r in runs:
        c = cost(r)
        rows.append([r.label, f"`{r.id}`", _fmt(c["wall_seconds"], 1),
                     _fmt(c["train_seconds"], 1),
                     MISSING if c["env_steps"] is None else f"{int(c['env_steps']):,}"])
    return ["Cost: wall clock = run end − start (evaluation and logging included; for a resumed "
            "run the sum of its segments, without the time between a stop and its resume); "
            "training = sum of the per-iteration `seconds_iteration` (baselines: "
            "`train_seconds` of pretraining); env steps = sum of the `env_steps` metric.", "",
            *_md_table(["method", "run", "wall clock (s)", "training (s)", "env steps"], rows),
            ""]


def _learning_curves(runs: list[ReportRun], family: str, out: Path) -> list[str]:
    lines = []
    paper = _row_at(plots.paper_rows(family).query("method == 'maml'"), "gradient_steps", 1)
    paper = None if paper is None else float(paper["mean_return"])
    for r in runs:
        if r.base_method != "maml":
            continue
        history = r.run.history(list(CURVE_KEYS))
        if history.empty:
            lines.append(f"Run `{r.id}` recorded no per-iteration returns; no learning curve.")
            continue
        variant = "" if r.method == "maml" else f"-{r.id[:8]}"  # a second run of the family
        name = (f"{family}{'' if r.k_shot is None else f'-k{r.k_shot}'}{variant}"
                "-learning-curve.png")
        selected = r.run.data.tags.get("maml.selected_iteration")
        evaluations = evaluation_history(r)
        plots.save(plots.learning_curve(history, f"meta-training: {family} "
                                                 f"{'' if r.k_shot is None else r.label}"
                                        .strip() + f" (run {r.id[:8]})",
                                        int(selected) if selected else None,
                                        evaluations=evaluations, paper=paper), out / name)
        what = "MSE" if "pre_mse" in history else "return"
        chosen = (f" Dashed line: the model selected on validation tasks (iteration "
                  f"{selected})." if selected else "")
        if selected and "val_score" in history and "post_return" in history:
            chosen = " Points: validation scores." + chosen
        if what == "return" and len(evaluations):
            chosen += " Squares: the held-out return after one step, as evaluated in training."
        if what == "return" and paper is not None:
            chosen += " Dotted line: the paper's return after one step."
        lines += [f"Learning curve ({r.label}, run `{r.id}`): {what} before and after "
                  f"adaptation per meta-iteration.{chosen}", "", f"![learning curve]({name})",
                  "", *_evaluation_lines(r, what, evaluations)]
    return lines


# evaluation_history's cost columns: their header, and how the caption names them
_COST_NAMES = {"train_seconds": ("training (s)", "training time (`seconds_iteration`)"),
               "env_steps": ("env steps", "env steps")}


def _evaluation_lines(report_run: ReportRun, what: str,
                      table: pd.DataFrame | None = None) -> list[str]:
    """The run's held-out evaluations during training (``evaluation_history``, or ``table``
    where already read), as a table; none for fewer than two."""
    table = evaluation_history(report_run) if table is None else table
    if len(table) < 2:
        return []
    steps = [c for c in table.columns if c.startswith("step_")]
    if what == "MSE":  # the steps the paper compares, after the unadapted one
        steps = [c for c in steps if int(c[5:]) in (0, *SUPERVISED_STEPS)]
    digits = 4 if what == "MSE" else 1
    cost_columns = [c for c in ("train_seconds", "env_steps") if table[c].notna().any()]
    rows = [[str(int(r["iteration"])), *(_fmt(r[c], digits) for c in steps),
             *(_fmt(r[c], 1) if c == "train_seconds"
               else MISSING if pd.isna(r[c]) else f"{int(r[c]):,}" for c in cost_columns)]
            for _, r in table.iterrows()]
    header = ["meta-iteration", *(f"{what} after {c[5:]} step{'s' * (c != 'step_1')}"
                                  for c in steps), *(_COST_NAMES[c][0] for c in cost_columns)]
    spent = [_COST_NAMES[c][1] for c in cost_columns]
    return [f"Held-out evaluations during training ({report_run.label}, run "
            f"`{report_run.id}`): mean {what} on the held-out tasks after k steps from the "
            "initialization of that meta-iteration"
            + (f", and the {' and '.join(spent)} spent before it" if spent else "")
            + ".", "", *_md_table(header, rows), ""]


def _adaptation_plot(runs: list[ReportRun], family: str, out: Path) -> list[str]:
    name = f"{family}-adaptation.png"
    first, *rest = runs
    fig = plots.adaptation_curve(first.summary, family, f"adaptation on held-out: {family}",
                                 others={f"ours: {r.label}": r.summary for r in rest},
                                 label=f"ours: {first.label}")
    plots.save(fig, out / name)
    return [f"![adaptation curves]({name})", ""]


def _per_task_panel(report_run: ReportRun) -> tuple[str, pd.DataFrame] | str:
    """``(coordinate, per-task returns with the coordinate)`` of a run, or why not."""
    tasks, family_or_why = held_out_task_table(report_run.run)
    if tasks is None:
        return family_or_why
    described = family_or_why.task_coordinate(tasks)
    if described is None:
        return "its family describes a task by no single number"
    coordinate, values = described
    try:
        per_task = report_run.run.table("evaluation/per_task.csv")
    except tracking.TrackingError as exc:
        return str(exc)
    if "return" not in per_task or set(per_task[TASK_ID]) != set(tasks[TASK_ID]):
        return "its evaluation/per_task.csv does not hold the returns of those tasks"
    by_task = pd.DataFrame({TASK_ID: tasks[TASK_ID], coordinate: values})
    return coordinate, per_task.merge(by_task, on=TASK_ID, validate="many_to_one")


# A task coordinate with at most this many values (halfcheetah-dir's and ant-dir's direction)
# gets a table of the mean return per value beside the per-task plot.
MAX_COORDINATE_VALUES = 4


def by_coordinate_value(panel: pd.DataFrame, coordinate: str) -> pd.DataFrame | None:
    """A run's mean return per value of the task coordinate and step (columns: the value,
    ``tasks``, one per step), and a last row ``equal weight``: the mean over the values, i.e.
    the return expected where each value is equally likely, whatever the held-out set's mix.
    None where the coordinate takes more than ``MAX_COORDINATE_VALUES`` values."""
    values = sorted(panel[coordinate].unique())
    if len(values) > MAX_COORDINATE_VALUES:
        return None
    means = panel.groupby([coordinate, "step"])["return"].mean().unstack("step")
    table = means.reindex(values)
    table.insert(0, "tasks", panel.groupby(coordinate)[TASK_ID].nunique().reindex(values))
    table.loc["equal weight"] = [np.nan, *table.drop(columns="tasks").mean()]
    table.index.name = coordinate
    return table


def _coordinate_value_lines(panels: dict[str, pd.DataFrame], coordinate: str) -> list[str]:
    tables = {label: by_coordinate_value(panel, coordinate) for label, panel in panels.items()}
    tables = {label: t for label, t in tables.items() if t is not None}
    if not tables:
        return []
    steps = sorted({c for t in tables.values() for c in t.columns if c != "tasks"})
    rows = [[label, value if isinstance(value, str) else f"{value:g}",
             _fmt(row["tasks"], 0), *[_fmt(row.get(s), 2) for s in steps]]
            for label, t in tables.items() for value, row in t.iterrows()]
    return [f"Mean return per {coordinate} of the held-out tasks, and with equal weight on "
            f"each {coordinate} (the task distribution's mix, whatever the held-out set's): a "
            "mean over all tasks hides a run that adapts well one way only.", "",
            *_md_table(["run", coordinate, "tasks", *[f"step {s}" for s in steps]], rows), ""]


def _per_task_plot(runs: list[ReportRun], family: str, out: Path) -> list[str]:
    """Each run's per-task returns against the family's task coordinate (e.g. the target
    velocity), where the family has one and the run's held-out tasks can be rebuilt."""
    try:
        probe = get_task_family(family)
        if probe.task_coordinate(probe.sample_tasks(1, np.random.default_rng(0))) is None:
            return []  # the family describes a task by no single number
    except (KeyError, ValueError, TypeError):
        return []
    panels: dict[str, pd.DataFrame] = {}
    left_out: list[str] = []
    coordinate = None
    for r in runs:
        panel = _per_task_panel(r)
        if isinstance(panel, str):
            left_out.append(f"{r.label} (run `{r.id}`): {panel}")
            continue
        coordinate, panels[r.label] = panel
    lines = []
    if panels:
        name = f"{family}-per-task.png"
        plots.save(plots.per_task_returns(panels, coordinate,
                                          f"per held-out task: {family}"), out / name)
        lines += [f"Per held-out task, its return after each adaptation step against the "
                  f"task's {coordinate}, one panel per run: where adaptation reaches and "
                  "where it falls short.", "", f"![per-task returns]({name})", ""]
        lines += _coordinate_value_lines(panels, coordinate)
    if left_out:
        lines += ["Left out of the per-task plot: " + "; ".join(left_out) + ".", ""]
    return lines


def _rl_section(family: str, runs: dict[str, ReportRun], out: Path
                ) -> tuple[list[str], pd.DataFrame]:
    table = rl_table(family, runs)
    ordered = [runs[m] for m in table["method"].drop_duplicates() if m in runs]
    rows = [[r.method, str(r.step), _fmt(r.mean_return, 2), _fmt(r.ci95, 2),
             _fmt(r.n_tasks, 0), _fmt(r.paper_mean_return, 2), _fmt(r.paper_ci95, 2),
             _fmt(r.paper_n_tasks, 0)] for r in table.itertuples()]
    lines = [f"## {family}", "", *_runs_list(ordered),
             "Mean return on the held-out tasks after k policy-gradient steps, ± the 95% "
             "confidence interval over tasks (1.96 sd / √n); — where there is no run or no "
             "paper row." + (" The oracle does not adapt: ours (the controller that steers "
                             "straight to the goal it sees) has the same return at every "
                             "step; the paper reports its oracle at step 0."
                             if "oracle" in set(table["method"]) else ""), "",
             *_md_table(["method", "steps", "ours", "ours ±95% CI", "ours tasks", "paper",
                         "paper ±95% CI", "paper tasks"], rows), ""]
    notes = plots.paper_rows(family)["note"].dropna().unique()
    lines += [f"Paper note: {n}." for n in notes] + ([""] if len(notes) else [])
    lines += _seed_lines(ordered, table)
    lines += _adaptation_plot(ordered, family, out)
    lines += _per_task_plot(ordered, family, out)
    lines += _learning_curves(ordered, family, out)
    lines += _cost_lines(ordered)
    compact = table.assign(cell=[
        f"{_fmt(r.mean_return, 2)} ({_fmt(r.paper_mean_return, 2)})"
        for r in table.itertuples()]).pivot(index="method", columns="step", values="cell")
    compact = compact.reindex([m for m in table["method"].drop_duplicates()])
    compact.columns = [f"step {s}" for s in compact.columns]
    return lines, compact.fillna(MISSING)


def _seed_lines(runs: list[ReportRun], table: pd.DataFrame) -> list[str]:
    """Over seeds: for each group of runs that differ only in the seed, the mean of their
    held-out means per step, the lowest and the highest."""
    rows = []
    for group in seed_groups(runs):
        base = group[0].base_method
        parts = [p for p in _command_parts(group[0].run) if not p.startswith("seed=")]
        parts = parts or [f"runs {', '.join(r.id[:8] for r in group)}"]
        name = f"{base} ({', '.join(parts)})"
        seeds = ", ".join(r.run.data.params.get("seed", "?") for r in group)
        steps = sorted(set.intersection(*(set(r.summary["step"].astype(int)) for r in group)))
        for step in steps:
            means = [float(_row_at(r.summary, "step", step)["mean_return"]) for r in group]
            paper = table[(table["method"] == base)
                          & (table["step"] == step)]["paper_mean_return"]
            rows.append([name, seeds, str(step), _fmt(float(np.mean(means)), 2),
                         _fmt(min(means), 2), _fmt(max(means), 2),
                         _fmt(paper.iloc[0] if len(paper) else None, 2)])
    if not rows:
        return []
    return ["Over seeds: runs of one method whose configs (MLflow params) differ only in the "
            "seed (and in `checkpoint_every`, `pipeline.*`), the mean of their held-out means "
            "after k steps, and the lowest and highest of them.", "",
            *_md_table(["runs", "seeds", "steps", "mean over seeds", "lowest", "highest",
                        "paper"], rows), ""]


def _supervised_section(family: str, runs: list[ReportRun], out: Path
                        ) -> tuple[list[str], pd.DataFrame]:
    table = supervised_table(runs)
    order = {r.id: r for r in runs}
    ordered = [order[i] for i in table["run_id"]]
    header = ["K", "method"]
    for step in SUPERVISED_STEPS:
        header += [f"MSE after {step} step{'s' if step > 1 else ''}", "±95% CI"]
    header += ["tasks", "run"]
    rows = []
    for r in table.itertuples():
        row = [str(r.k_shot), r.method]
        for step in SUPERVISED_STEPS:
            row += [_fmt(getattr(r, f"mse_step_{step}"), 3),
                    _fmt(getattr(r, f"ci95_step_{step}"), 3)]
        rows.append([*row, str(r.n_tasks), f"`{r.run_id}`"])
    lines = [f"## {family} (regression)", "", *_runs_list(ordered),
             "Mean squared error on the held-out tasks after fine-tuning on K examples for 1 and "
             "10 gradient steps, ± the 95% confidence interval over tasks; — where the run "
             "evaluated fewer steps. The paper's sinusoid numbers are a figure, not a table, so "
             "there is no paper column.", "",
             *_md_table(header, rows), ""]
    lines += _adaptation_plot(ordered, family, out)
    lines += _learning_curves(ordered, family, out)
    lines += _cost_lines(ordered)
    compact = pd.DataFrame({
        "K": table["k_shot"], "method": table["method"],
        **{f"{s} step{'s' if s > 1 else ''}": [_fmt(v, 3) for v in table[f"mse_step_{s}"]]
           for s in SUPERVISED_STEPS}}).set_index(["K", "method"])
    return lines, compact


def write_report(out: str | Path = "docs/results", families: list[str] | None = None,
                 run_ids: list[str] | None = None, command: str | None = None) -> dict:
    """Write ``out/README.md`` and its PNG plots from the configured MLflow store and the
    exported runs among ``run_ids``; returns the path, the plots, the runs by (family, method,
    K) and a compact text version."""
    families = list(dict.fromkeys(families or [])) or None
    chosen, notes, where = select_runs(families, run_ids)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_family: dict[str, list[ReportRun]] = {}
    for r in chosen.values():
        by_family.setdefault(r.family, []).append(r)
    names = families or sorted(by_family, key=lambda f: (_supervised(f), f))
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Results: our runs beside the paper's", "",
             f"Made by {_code(command) if command else '`flows.report.write_report` (Python)'} "
             f"on {now}, from {where}.", "",
             "Ours: for each task family the latest FINISHED `maml train` run (MAML) and "
             "`maml baseline` run per method (unless chosen with `--run`), read from each run's "
             "`evaluation/summary.csv`. Paper: Finn, Abbeel & Levine (2017), "
             "`data/maml_paper_rl_returns.csv` (40 test tasks, read from the result files of "
             "the paper's code, cbfinn/maml_rl).", ""]
    compact_parts = []
    for family in names:
        runs = by_family[family]
        if any(r.summary is not None and "mean_mse" in r.summary for r in runs):
            section, compact = _supervised_section(family, runs, out)
        else:
            section, compact = _rl_section(family, {r.method: r for r in runs}, out)
        lines += section
        compact_parts.append(f"{family}\n{compact.to_string()}")
    if notes:
        lines += ["## Runs passed over", "", *[f"- {n}" for n in notes], ""]
    path = out / "README.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    images = dict.fromkeys(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", "\n".join(lines)))
    return {"path": str(path), "images": [str(out / name) for name in images],
            "runs": {k: v.id for k, v in chosen.items()},
            "compact": "\n\n".join(compact_parts)}
