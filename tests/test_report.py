"""``maml report`` on a store holding a tiny meta-train run and an oracle baseline run, both
made through the command line (so their ``maml.command`` tags are set), in an experiment of
their own."""

from __future__ import annotations

import contextlib
import re
import shlex
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAV = str(ROOT / "configs" / "navigation2d.yaml")
TINY = ["iterations=2", "meta_batch_size=4", "episodes_per_task=4", "evaluation.every=0",
        "evaluation.steps=2", "evaluation.episodes_per_task=4", "task.test_tasks=null",
        "evaluation.num_tasks=6", "pipeline.register_model=false",
        "policy.hidden_sizes=[16, 16]", "checkpoint_every=2", "pipeline.retry_delay_seconds=0"]
PNG = b"\x89PNG\r\n\x1a\n"
PAUSE = 3.0  # seconds between the meta-train run's stop and its resume


def _sets() -> list[str]:
    return [arg for s in TINY for arg in ("--set", s)]


@pytest.fixture(scope="module")
def store(pipeline):
    """An experiment of its own with one meta-train run (2 iterations, then resumed after a
    pause of PAUSE seconds for 2 more) and one oracle baseline run."""
    from flows import tracking
    from flows.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_EXPERIMENT_NAME", f"report-{uuid.uuid4().hex[:8]}")
        train = ["train", NAV, *_sets()]
        oracle = ["baseline", NAV, "--method", "oracle", *_sets()]
        assert main(train) == 0
        tracking.load_tracking_config().setup()
        (first,) = tracking.search_runs()
        time.sleep(PAUSE)
        resume = ["train", "--resume", first.info.run_id, "--set", "iterations=4"]
        assert main(resume) == 0
        assert main(oracle) == 0
        tracking.load_tracking_config().setup()
        runs = {r.data.tags["maml.kind"]: r for r in tracking.search_runs()}
        assert set(runs) == {"meta-train", "baseline"}
        yield {"runs": runs, "argv": {"meta-train": train, "baseline": oracle},
               "resume": resume}
    tracking.load_tracking_config().setup()


def test_runs_record_their_command_line(store):
    from maml_core.allocator import allocator_in_use

    for kind, run in store["runs"].items():
        assert run.data.tags["maml.command"] == shlex.join(["maml", *store["argv"][kind]])
        assert run.data.tags["maml.allocator"] == allocator_in_use()  # glibc here


def test_report_has_our_numbers_the_papers_and_plots(store, tmp_path, capsys):
    from flows import tracking
    from flows.cli import main
    from flows.plots import paper_rows

    out = tmp_path / "results"
    argv = ["report", "--out", str(out), "--family", "navigation2d"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    text = (out / "README.md").read_text()
    assert f"`{shlex.join(['maml', *argv])}`" in text  # the report's own command

    images = sorted(out.glob("*.png"))
    assert {p.name for p in images} == {"navigation2d-adaptation.png",
                                        "navigation2d-learning-curve.png",
                                        "navigation2d-per-task.png"}
    for image in images:
        data = image.read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, image
        assert f"]({image.name})" in text

    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
            for line in text.splitlines() if line.startswith("| ")}
    for kind, method in (("meta-train", "maml"), ("baseline", "oracle")):
        run = store["runs"][kind]
        assert f"`{run.info.run_id}`" in text
        assert run.data.tags["maml.command"] in text
        summary = tracking.read_table(run.info.run_id, "evaluation/summary.csv")
        for r in summary.itertuples():
            line = rows[(method, str(r.step))]
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[2:5] == [f"{r.mean_return:.2f}", f"{r.ci95:.2f}", str(r.n_tasks)]
    for r in paper_rows("navigation2d").itertuples():
        cells = [c.strip() for c in rows[(r.method, str(r.gradient_steps))].strip("|")
                 .split("|")]
        assert cells[5:8] == [f"{r.mean_return:.2f}", f"{r.ci95:.2f}", str(r.n_tasks)]
    # No pretrained or random run: ours is missing, the paper's is there.
    assert rows[("random", "0")].split("|")[3].strip() == "—"

    # The cost table: env steps summed over the meta-train run's iterations; none for the
    # oracle.
    history = tracking.metric_history(store["runs"]["meta-train"].info.run_id, ["env_steps"])
    assert f"{int(history['env_steps'].sum()):,}" in text
    # stdout: the compact table, ours (paper)
    oracle0 = tracking.read_table(store["runs"]["baseline"].info.run_id,
                                  "evaluation/summary.csv")["mean_return"][0]
    assert f"{oracle0:.2f} (-2.29)" in printed
    assert "README.md" in printed


def test_report_names_each_resume_and_leaves_the_pause_out_of_the_wall_clock(store, tmp_path):
    from flows import tracking
    from flows.report import ReportRun, cost, write_report

    tracking.load_tracking_config().setup()
    run = tracking.get_run(store["runs"]["meta-train"].info.run_id)
    (resumed,) = tracking.resumes(run.data.tags)
    assert resumed[1:] == (2, shlex.join(["maml", *store["resume"]]))
    report = ReportRun(run=run, family="navigation2d", method="maml", k_shot=None,
                       summary=None)
    figures = cost(report)
    span = (run.info.end_time - run.info.start_time) / 1000
    # The resume is tagged to the second, so its segment may start up to 1 s early.
    assert figures["train_seconds"] < figures["wall_seconds"] <= span - PAUSE + 1.0
    assert len(tracking.metric_history(run.info.run_id, ["seconds_iteration"])) == 4

    text = Path(write_report(tmp_path / "r", run_ids=[run.info.run_id])["path"]).read_text()
    assert (f"  - resumed at iteration 2: `{shlex.join(['maml', *store['resume']])}`"
            in text)


def test_report_takes_runs_by_id(store, tmp_path):
    from flows import tracking
    from flows.report import write_report

    tracking.load_tracking_config().setup()
    train_id = store["runs"]["meta-train"].info.run_id
    report = write_report(tmp_path / "r", run_ids=[train_id])
    assert report["runs"][("navigation2d", "maml", None)] == train_id
    assert "(Python)" in Path(report["path"]).read_text()
    twice = write_report(tmp_path / "r2", run_ids=[train_id, train_id])
    assert [k for k in twice["runs"] if k[0] == "navigation2d" and k[1].startswith("maml")] \
        == [("navigation2d", "maml", None)]  # given twice, shown once


def test_report_bad_input(store, tmp_path, capsys, monkeypatch):
    from flows.cli import main

    cases = [
        (["report", "--out", str(tmp_path), "--family", "ant-vel"],
         "no FINISHED meta-train or baseline runs of ant-vel"),
        (["report", "--out", str(tmp_path), "--run", "nope"], "is neither an MLflow run id"),
        (["report", "--out", str(tmp_path), "--run", "0" * 32], "does not exist"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"empty-{uuid.uuid4().hex[:8]}")
    assert main(["report", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no FINISHED meta-train or baseline runs in MLflow experiment" in err
    assert "maml baseline" in err  # how to make some
    assert not (tmp_path / "README.md").exists()


@contextlib.contextmanager
def _second_run(store, kind: str, argv: list[str]):
    """Make one more ``kind`` run with ``argv`` through the command line; yields (the store's
    run id of that kind, the new run) and deletes the new run afterwards."""
    import mlflow

    from flows import tracking
    from flows.cli import main

    assert main(argv) == 0
    tracking.load_tracking_config().setup()
    first = store["runs"][kind].info.run_id
    (second,) = [r for r in tracking.search_runs() if r.info.run_id != first
                 and r.data.tags["maml.kind"] == kind]
    try:
        yield first, second
    finally:
        mlflow.MlflowClient().delete_run(second.info.run_id)


def test_report_shows_a_second_baseline_run_of_a_method_beside_the_first(store, tmp_path):
    """Two oracle runs of navigation2d given with --run: the second is a row group of its own,
    'oracle (<config, overrides>)', with its own numbers."""
    from flows import tracking
    from flows.report import write_report

    again = ["baseline", NAV, "--method", "oracle", *_sets(), "--set", "evaluation.seed=5"]
    with _second_run(store, "baseline", again) as (first, second):
        label = f"oracle (navigation2d, {', '.join([*TINY, 'evaluation.seed=5'])})"
        report = write_report(tmp_path / "r", run_ids=[first, second.info.run_id])
        assert report["runs"][("navigation2d", "oracle", None)] == first
        assert report["runs"][("navigation2d", label, None)] == second.info.run_id
        text = Path(report["path"]).read_text()
        summaries = [tracking.read_table(run_id, "evaluation/summary.csv")
                     for run_id in (first, second.info.run_id)]
        assert summaries[0]["mean_return"][0] != summaries[1]["mean_return"][0]
        for summary, name in zip(summaries, ("oracle", label), strict=True):
            row = next(line for line in text.splitlines() if line.startswith(f"| {name} | 0 |"))
            assert f"| {summary['mean_return'][0]:.2f} |" in row


def test_report_shows_a_second_maml_run_of_a_family_beside_the_first(store, tmp_path):
    """Two meta-train runs of navigation2d given with --run: the second gets a row group of its
    own, labelled by its config and overrides, and a learning curve of its own."""
    from flows import tracking
    from flows.report import write_report

    fast = str(ROOT / "configs" / "navigation2d-fast.yaml")
    argv = ["train", fast, *_sets(), "--set", "inner.step_size=0.3"]
    with _second_run(store, "meta-train", argv) as (first, second):
        label = f"maml (navigation2d-fast, {', '.join([*TINY, 'inner.step_size=0.3'])})"
        report = write_report(tmp_path / "r", run_ids=[first, second.info.run_id])
        assert report["runs"][("navigation2d", "maml", None)] == first
        assert report["runs"][("navigation2d", label, None)] == second.info.run_id
        text = Path(report["path"]).read_text()
        methods = [line.split("|")[1].strip() for line in text.splitlines()
                   if line.startswith("| ") and line.split("|")[2].strip() == "1"]
        assert methods[:2] == ["maml", label]  # the variant right after the paper's-protocol
        summary = tracking.read_table(second.info.run_id, "evaluation/summary.csv")
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} | 1 |"))
        assert f"| {summary['mean_return'][1]:.2f} |" in row
        # The two configs differ in a task option: the section says so.
        assert ("**These runs were made with different task options** (maml: the family's "
                "defaults; " + label + ": normalized_actions=true; oracle: the family's "
                "defaults)") in text
        curves = sorted(p.name for p in (tmp_path / "r").glob("*learning-curve.png"))
        assert len(curves) == 2 and "navigation2d-learning-curve.png" in curves, curves
        assert "Over seeds" not in text  # another config, not another seed


def test_report_averages_runs_that_differ_only_in_the_seed(store, tmp_path):
    """A second meta-train run of the same config with another seed (4 iterations in one go,
    as many as the first made in two): the report's over-seeds table gives the mean of the two
    runs' held-out means, the lowest and the highest."""
    from flows import tracking
    from flows.report import write_report

    argv = ["train", NAV, *_sets(), "--set", "seed=7", "--set", "iterations=4"]
    with _second_run(store, "meta-train", argv) as (first, second):
        report = write_report(tmp_path / "r", run_ids=[first, second.info.run_id])
        text = Path(report["path"]).read_text()
        means = [float(tracking.read_table(run_id, "evaluation/summary.csv")
                       .set_index("step").loc[1, "mean_return"])
                 for run_id in (first, second.info.run_id)]
        assert means[0] != means[1]
        seeds = {run_id: tracking.get_run(run_id).data.params["seed"]
                 for run_id in (first, second.info.run_id)}
        assert seeds[second.info.run_id] == "7"
        over_seeds = text.split("Over seeds", 1)[1].split("\n\n")[1].splitlines()
        row = next(line for line in over_seeds if "| 1 | " in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{seeds[first]}, 7"
        assert cells[3:6] == [f"{(means[0] + means[1]) / 2:.2f}", f"{min(means):.2f}",
                              f"{max(means):.2f}"]
        assert cells[6] == "-11.68"  # the paper's MAML after one step
        assert "seed=7" not in cells[0]


def test_per_task_plot_rebuilds_each_runs_held_out_tasks_and_checks_their_digest(
        store, tmp_path, monkeypatch):
    """The per-task plot needs each run's held-out tasks: they are rebuilt from the run's
    config (the seeded draw, or the task file, also once that file has moved to this
    checkout's data/) and used only while they have the digest the run logged; a run whose
    table changed is left out of the plot, and the report says why."""
    import numpy as np
    import pandas as pd

    from flows import report as report_module
    from flows import runrecord, tracking
    from flows.report import _report_run, write_report
    from flows.runrecord import held_out_task_table
    from maml_core.tasks import get_task_family
    from maml_core.tasksets import save_task_set

    goals = get_task_family("navigation2d").sample_tasks(6, np.random.default_rng(7))
    goals["task_id"] = [11, 3, 7, 0, 25, 4]  # not row numbers: the join must go by id
    tasks_file = save_task_set(goals, tmp_path / "elsewhere" / "goals.csv")
    argv = ["baseline", NAV, "--method", "oracle", *_sets(), "--set",
            f"task.test_tasks={tasks_file}"]
    with _second_run(store, "baseline", argv) as (_, second):
        train = tracking.get_run(store["runs"]["meta-train"].info.run_id)
        drawn, family = held_out_task_table(train)
        per_task = tracking.read_table(train.info.run_id, "evaluation/per_task.csv")
        assert sorted(per_task["task_id"].unique()) == sorted(drawn["task_id"])
        name, distance = family.task_coordinate(drawn)
        assert name == "goal distance from the start"
        np.testing.assert_allclose(distance, np.hypot(drawn["goal_x"], drawn["goal_y"]))
        from_file, _ = held_out_task_table(second)
        pd.testing.assert_frame_equal(from_file, goals)
        coordinate, panel = report_module._per_task_panel(_report_run(second))
        goal = goals.set_index("task_id").loc[panel["task_id"]]
        np.testing.assert_allclose(panel[coordinate], np.hypot(goal["goal_x"], goal["goal_y"]))
        returns = tracking.read_table(second.info.run_id, "evaluation/per_task.csv")
        pd.testing.assert_frame_equal(panel[returns.columns], returns)

        ids = [train.info.run_id, second.info.run_id]
        report = write_report(tmp_path / "r", run_ids=ids)
        assert str(tmp_path / "r" / "navigation2d-per-task.png") in report["images"]
        assert "Left out of the per-task plot" not in Path(report["path"]).read_text()

        moved = tmp_path / "data"
        moved.mkdir()
        tasks_file.rename(moved / tasks_file.name)
        monkeypatch.setattr(runrecord, "DATA", moved)
        pd.testing.assert_frame_equal(held_out_task_table(second)[0], goals)

        save_task_set(goals.assign(goal_x=-goals["goal_x"]), moved / tasks_file.name)
        tasks, why = held_out_task_table(second)
        assert tasks is None and "no task table with the digest it logged" in why, why
        report = write_report(tmp_path / "r2", run_ids=ids)
        text = Path(report["path"]).read_text()
        assert f"(run `{second.info.run_id}`): no task table with the digest it logged" in text
        assert str(tmp_path / "r2" / "navigation2d-per-task.png") in report["images"]
        assert (tmp_path / "r2" / "navigation2d-per-task.png").read_bytes().startswith(PNG)


def _comparable(text: str) -> list[str]:
    """A report's lines without its first line's command, date and source, and without the
    runs list's note of the export each run was read from."""
    lines = text.splitlines()
    return [re.sub(r", read from `[^`]*`\)", ")", line) for line in lines
            if not line.startswith("Made by ")]


def test_exported_runs_remake_the_report_without_the_store(store, tmp_path, monkeypatch,
                                                            capsys):
    """``maml export`` writes each run as plain files; ``maml report --run FOLDER`` remakes
    from them alone the same report (numbers, resumes, costs, plots) as from the store, and
    the exported model loads like the run's."""
    import pandas as pd
    import torch
    import yaml

    from flows import tracking
    from flows.cli import main
    from flows.config import load_run_config
    from flows.evaluation import evaluate_model
    from flows.training import store_root
    from maml_core.checkpoint import latest_checkpoint
    from maml_core.trainer import MetaLearner

    ids = [store["runs"][kind].info.run_id for kind in ("meta-train", "baseline")]
    runs = tmp_path / "runs"
    assert main(["export", *ids, "--out", str(runs)]) == 0
    printed = capsys.readouterr().out
    assert all(f"{i} (" in printed for i in ids), printed
    train = runs / ids[0]
    for name in ("run.yaml", "metrics.csv", "artifacts/config.yaml",
                 "artifacts/evaluation/summary.csv", "artifacts/evaluation/per_task.csv",
                 "model/iter-000004.json", "model/iter-000004.safetensors"):
        assert (train / name).is_file(), name  # no logged model: the last checkpoint
    assert not list(runs.glob(".*"))  # no work folder left behind

    assert main(["report", "--out", str(tmp_path / "from-store"), "--run", *ids]) == 0
    # From here on the store is somewhere that does not exist (reading it would create it),
    # and every way into it fails.
    nowhere = tmp_path / "no-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{nowhere / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "_ACTIVE", None)

    def no_store(*args, **kwargs):
        raise AssertionError("the MLflow store was read")

    for name in ("_client", "get_run", "search_runs", "active_config"):
        monkeypatch.setattr(tracking, name, no_store)
    exported = [str(runs / i) for i in ids]
    assert main(["report", "--out", str(tmp_path / "from-export"), "--run", *exported]) == 0
    assert not nowhere.exists()
    capsys.readouterr()

    texts = {w: (tmp_path / w / "README.md").read_text() for w in ("from-store", "from-export")}
    assert f"from exported runs under `{runs}`." in texts["from-export"].splitlines()[2]
    assert f"git {store['runs']['meta-train'].data.tags['maml.git_commit'][:10]}, read from " \
           f"`{train}`)" in texts["from-export"]
    assert _comparable(texts["from-export"]) == _comparable(texts["from-store"])
    assert "resumed at iteration 2" in texts["from-export"]
    images = sorted(p.name for p in (tmp_path / "from-store").glob("*.png"))
    assert len(images) == 3
    for name in images:
        assert ((tmp_path / "from-export" / name).read_bytes()
                == (tmp_path / "from-store" / name).read_bytes()), name

    monkeypatch.undo()
    tracking.load_tracking_config().setup()

    def curve(ref: str):
        return evaluate_model(ref, steps=1, episodes_per_task=2, log=False)["curve"]

    checkpoints = str(store_root() / ids[0] / "checkpoints")
    pd.testing.assert_frame_equal(curve(str(train)), curve(checkpoints))

    # With a logged policy, model/ holds it, and it evaluates like the run's.
    learner = MetaLearner(load_run_config(data=yaml.safe_load(
        (train / "artifacts" / "config.yaml").read_text())))
    learner.restore(latest_checkpoint(checkpoints))
    tracking.log_policy_model(ids[0], learner, f"export-{uuid.uuid4().hex[:8]}")
    learner.close()
    assert main(["export", ids[0], "--out", str(runs)]) == 0
    assert sorted(p.name for p in (train / "model").iterdir()) == ["params.safetensors",
                                                                    "policy.json"]
    _, theirs, _, _ = tracking.load_policy(ids[0])
    _, ours, _, info = tracking.load_policy(str(train / "model"))
    assert info["run_id"] == ids[0] and theirs.keys() == ours.keys()
    for key, value in theirs.items():
        assert torch.equal(value, ours[key]), key
    pd.testing.assert_frame_equal(curve(ids[0]), curve(str(train)))
    pd.testing.assert_frame_equal(curve(ids[0]), curve(checkpoints))


def test_export_again_replaces_an_export_only_once_complete(store, tmp_path, monkeypatch):
    """A re-export that fails half-way leaves the earlier export as it was, and no work
    folder; one that succeeds replaces it."""
    from flows import runrecord

    run_id = store["runs"]["meta-train"].info.run_id
    first = runrecord.export_run(run_id, tmp_path)
    before = (first / "run.yaml").read_text()
    (first / "mark").write_text("the first export")

    def broken(run, dest):
        raise OSError("disk full")

    monkeypatch.setattr(runrecord, "_copy_model", broken)
    with pytest.raises(OSError, match="disk full"):
        runrecord.export_run(run_id, tmp_path)
    assert (first / "run.yaml").read_text() == before and (first / "mark").is_file()
    assert list((first / "model").glob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_id]
    monkeypatch.undo()
    again = runrecord.export_run(run_id, tmp_path)
    assert again == first and not (again / "mark").exists()
    assert (again / "run.yaml").is_file() and list((again / "model").glob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_id]


def test_export_and_report_bad_input(store, tmp_path, capsys):
    from flows.cli import main

    run_id = store["runs"]["baseline"].info.run_id
    (tmp_path / "empty").mkdir()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "run.yaml").write_text("format: 99\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.yaml").write_text("- a list\n")
    cases = [
        (["export", "nope"], "'nope' is not an MLflow run id"),
        (["export", "0" * 32], "does not exist"),
        (["report", "--out", str(tmp_path / "r"), "--run", str(tmp_path / "empty")],
         "nor a folder written by `maml export`"),
        (["report", "--out", str(tmp_path / "r"), "--run", str(wrong)],
         "was written in export format 99 by a newer version of this project"),
        (["report", "--out", str(tmp_path / "r"), "--run", str(broken)],
         "is not an exported run (no format number); export the run again"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "r" / "README.md").exists()
    assert main(["export", run_id, "--out", str(tmp_path / "x")]) == 0
    both = ["report", "--out", str(tmp_path / "r"), "--run", run_id, str(tmp_path / "x" / run_id)]
    assert main(both) == 0  # the same run by id and as its export: shown once
    text = (tmp_path / "r" / "README.md").read_text()
    assert text.count(f"run `{run_id}` (") == 1


def test_a_failed_swap_puts_the_earlier_export_back(tmp_path):
    from flows.runrecord import _swap_in

    dest = tmp_path / "run"
    dest.mkdir()
    (dest / "run.yaml").write_text("the earlier export")
    with pytest.raises(FileNotFoundError):
        _swap_in(tmp_path / "not-written", dest)  # the new folder cannot be moved in
    assert (dest / "run.yaml").read_text() == "the earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_export_keeps_its_task_file_for_another_checkout(store, tmp_path):
    """A run's config names its held-out task file by a path of the machine that made it:
    the export keeps a copy (checked against the logged digest), which the per-task table
    and ``maml evaluate`` use once that path holds nothing; an export without a model says
    so."""
    import numpy as np
    import pandas as pd

    from flows.cli import main
    from flows.evaluation import evaluate_model
    from flows.runrecord import ExportedRecord, export_run, held_out_task_table
    from maml_core.tasks import get_task_family
    from maml_core.tasksets import save_task_set

    goals = get_task_family("navigation2d").sample_tasks(5, np.random.default_rng(3))
    tasks_file = save_task_set(goals, tmp_path / "machine" / "goals.csv")
    argv = ["train", NAV, *_sets(), "--set", f"task.test_tasks={tasks_file}"]
    with _second_run(store, "meta-train", argv) as (_, run):
        export = export_run(run.info.run_id, tmp_path / "runs")
    assert (export / "artifacts" / "tasks" / "goals.csv").read_bytes() == \
        tasks_file.read_bytes()
    tasks_file.unlink()
    tasks, _ = held_out_task_table(ExportedRecord(export))
    pd.testing.assert_frame_equal(tasks, goals)
    result = evaluate_model(str(export), steps=1, episodes_per_task=2, log=False)
    assert sorted(result["curve"]["task_id"].unique()) == sorted(goals["task_id"])

    oracle = export_run(store["runs"]["baseline"].info.run_id, tmp_path / "runs")
    assert not (oracle / "model").exists()  # a baseline that logged no policy
    assert main(["evaluate", str(oracle)]) == 2


def test_mean_return_per_direction_and_with_equal_weight():
    """Three tasks forward, one backward: the per-direction means and their plain mean, which
    weighs each direction alike whatever the held-out mix (all numbers by hand)."""
    import pandas as pd

    from flows.report import _coordinate_value_lines, by_coordinate_value

    panel = pd.DataFrame({"task_id": [0, 1, 2, 3] * 2, "step": [0] * 4 + [1] * 4,
                          "direction": [1.0, 1.0, 1.0, -1.0] * 2,
                          "return": [-10.0, -20.0, -30.0, 40.0, 100.0, 200.0, 300.0, 600.0]})
    table = by_coordinate_value(panel, "direction")
    assert list(table.index) == [-1.0, 1.0, "equal weight"]
    assert list(table["tasks"].iloc[:2]) == [1, 3]
    assert list(table[0]) == [40.0, -20.0, 10.0]
    assert list(table[1]) == [600.0, 200.0, 400.0]  # the mean over all four tasks is 300
    lines = _coordinate_value_lines({"maml": panel}, "direction")
    assert "| maml | equal weight | — | 10.00 | 400.00 |" in lines
    assert "| maml | -1 | 1 | 40.00 | 600.00 |" in lines
    # a coordinate of many values (a target velocity) gets no table
    many = panel.assign(direction=[0.1, 0.2, 0.3, 0.4, 0.5, 0.2, 0.3, 0.4])
    assert by_coordinate_value(many, "direction") is None
    assert _coordinate_value_lines({"maml": many}, "direction") == []


def test_seed_groups_keep_apart_runs_that_differ_in_a_task_option_one_of_them_names():
    """Exported halfcheetah-vel runs of the paper config, one with the default start noise and
    one with ``--set task.options.reset_noise=rllab`` (a key only the second run's params
    have), are two tasks, not two seeds; two balanced halfcheetah-dir seeds are one group."""
    from flows.report import ReportRun, seed_groups

    def exported(run_id: str, family: str) -> ReportRun:
        return ReportRun(run=ROOT / "docs" / "results" / "runs" / run_id, family=family,
                         method="maml", k_shot=None, summary=None)

    default = exported("79772b51712d43829ae74eeddb870b6b", "halfcheetah-vel")
    rllab = exported("ea2e617e38b746be8f35e6084abfb566", "halfcheetah-vel")
    assert "task.options.reset_noise" not in default.run.data.params
    assert rllab.run.data.params["task.options.reset_noise"] == "rllab"
    assert seed_groups([default, rllab]) == []
    seeds = [exported("dcfa149268fc49028e24ca9e01f2294b", "halfcheetah-dir"),
             exported("7c97d24556044dfea9002169803380f5", "halfcheetah-dir")]
    (group,) = seed_groups(seeds)
    assert [r.run.data.params["seed"] for r in group] == ["0", "1"]


def test_variant_label_takes_the_overrides_of_the_run_s_resumes():
    """An exported ant-vel run trained with ``--set iterations=100`` and resumed with ``--set
    iterations=240`` is labelled with what its last iterations ran with: 240, the other
    overrides kept in order; a run never resumed keeps its command's overrides."""
    from flows import tracking
    from flows.report import _variant
    from flows.runrecord import open_record

    runs = ROOT / "docs" / "results" / "runs"
    resumed = open_record(runs / "0dedb1b4b46c4d8b9471b97f2840d3c6")
    ((_, at, command),) = tracking.resumes(resumed.data.tags)
    assert (at, command.split()[-2:]) == (100, ["--set", "iterations=240"])
    assert _variant(resumed, "maml") == ("maml (ant-vel-fast, iterations=240, "
                                         "task.options.rllab_model=true, "
                                         "task.options.com_velocity=true)")
    once = open_record(runs / "ea2e617e38b746be8f35e6084abfb566")
    assert tracking.resumes(once.data.tags) == []
    assert _variant(once, "maml") == "maml (halfcheetah-vel, task.options.reset_noise=rllab)"


def test_variant_label_names_the_family_of_a_warm_start_from_another_family(tmp_path):
    """A warm start from an exported model of the same family is labelled by its path alone;
    one from another family's exported model (an ant-dir model for ant-vel) says so."""
    import shutil

    import yaml

    from flows import tracking
    from flows.report import _variant
    from flows.runrecord import open_record

    runs = ROOT / "docs" / "results" / "runs"
    same = open_record(runs / "2a6b0684842d4c0f8bf72a3373cd5daa")  # from ant-vel's 0dedb1b4
    assert _variant(same, "maml").endswith(
        "init-model=docs/results/runs/0dedb1b4b46c4d8b9471b97f2840d3c6/model)")
    ant_dir = runs / "1a8c0542f68f4449b130e8bc119f86d1"
    assert open_record(ant_dir).data.tags["maml.task_family"] == "ant-dir"
    copy = tmp_path / "2a6b0684842d4c0f8bf72a3373cd5daa"
    shutil.copytree(runs / "2a6b0684842d4c0f8bf72a3373cd5daa", copy,
                    ignore=shutil.ignore_patterns("model", "artifacts"))
    meta = yaml.safe_load((copy / "run.yaml").read_text())
    for init in (ant_dir / "model", ant_dir):  # the model folder or the export's folder
        meta["tags"][tracking.TAG_COMMAND] = (
            f"maml train configs/ant-vel-fast.yaml --set iterations=400 --init-model {init}")
        (copy / "run.yaml").write_text(yaml.safe_dump(meta))
        assert _variant(open_record(copy), "maml") == (
            f"maml (ant-vel-fast, iterations=400, init-model={init} (an ant-dir model))")


def _ant_vel_copy(tmp_path: Path, seed: int, edit=lambda meta: None):
    """A copy of the exported ant-vel run (resumed from 100 to 240 iterations) under another
    run id and seed, its run.yaml changed by ``edit``: a ReportRun for seed grouping."""
    import yaml

    from flows.report import ReportRun

    source = ROOT / "docs" / "results" / "runs" / "0dedb1b4b46c4d8b9471b97f2840d3c6" / "run.yaml"
    meta = yaml.safe_load(source.read_text(encoding="utf-8"))
    meta["info"]["run_id"] = f"{seed:032x}"
    meta["params"]["seed"] = str(seed)
    edit(meta)
    folder = tmp_path / meta["info"]["run_id"]
    folder.mkdir()
    (folder / "run.yaml").write_text(yaml.safe_dump(meta), encoding="utf-8")
    return ReportRun(run=folder, family="ant-vel", method="maml", k_shot=None, summary=None)


def test_seed_groups_compare_what_resumed_runs_last_trained_with(tmp_path):
    """Seed grouping reads a resume's ``--set`` overrides over the run's params (which keep
    its first segment's values): copies of the exported ant-vel run resumed to 240 iterations
    are seeds of it when they were resumed alike, and another task when one never was (it
    trained 100 iterations, as every copy's ``iterations`` param says)."""
    from flows.report import seed_groups

    def never_resumed(meta):
        meta["tags"] = {k: v for k, v in meta["tags"].items() if "resume" not in k}

    runs = [_ant_vel_copy(tmp_path, 0), _ant_vel_copy(tmp_path, 1),
            _ant_vel_copy(tmp_path, 2, never_resumed)]
    assert all(r.run.data.params["iterations"] == "100" for r in runs)
    (group,) = seed_groups(runs)
    assert [r.run.data.params["seed"] for r in group] == ["0", "1"]


def test_seed_groups_compare_values_not_how_they_were_written(tmp_path):
    """Runs whose step size was written ``0.1`` and ``1e-1`` (which YAML 1.1 reads as a
    string) and whose task option was written ``true`` and ``True`` are seeds of one config;
    a step size of ``0.2`` or ``--set inner.step_size=2e-1`` on a resume is another."""
    from flows import tracking
    from flows.report import seed_groups

    def params(**changed):
        def edit(meta):
            meta["params"].update(changed)
        return edit

    def resumed_with(setting):
        def edit(meta):
            key = next(k for k in meta["tags"] if k.startswith(tracking.TAG_RESUME_COMMAND))
            meta["tags"][key] += f" --set {setting}"
        return edit

    assert _ant_vel_copy(tmp_path, 9).run.data.params["inner.step_size"] == "0.1"
    runs = [_ant_vel_copy(tmp_path, 0),
            _ant_vel_copy(tmp_path, 1, params(**{"inner.step_size": "1e-1",
                                                 "task.options.rllab_model": "True"})),
            _ant_vel_copy(tmp_path, 2, params(**{"inner.step_size": "0.2"})),
            _ant_vel_copy(tmp_path, 3, resumed_with("inner.step_size=2e-1")),
            _ant_vel_copy(tmp_path, 4, resumed_with("inner.step_size=1.0e-1"))]
    groups = seed_groups(runs)
    assert [[r.run.data.params["seed"] for r in g] for g in groups] == [["0", "1", "4"],
                                                                       ["2", "3"]]


def test_evaluation_history_sums_the_cost_before_each_evaluation(tmp_path):
    """Held-out evaluations at meta-iterations 2 and 4 of a four-iteration run: each row holds
    the returns after each step and the seconds and env steps of the iterations before it;
    iteration 1, recorded twice (a retry), counts once, with its later value."""
    import yaml

    from flows.report import ReportRun, _evaluation_lines, evaluation_history

    folder = tmp_path / ("ab" * 16)
    folder.mkdir()
    metrics = {"eval_return_step_0": -9.0, "eval_return_step_1": -4.0, "post_return": 1.0}
    (folder / "run.yaml").write_text(yaml.safe_dump({
        "format": 1, "info": {"run_id": "ab" * 16, "status": "FINISHED"},
        "tags": {}, "params": {}, "metrics": metrics}), encoding="utf-8")
    rows = [("seconds_iteration", 0, 1.0, 10), ("seconds_iteration", 1, 5.0, 20),
            ("seconds_iteration", 1, 2.0, 30), ("seconds_iteration", 2, 3.0, 40),
            ("seconds_iteration", 3, 4.0, 50)]
    rows += [("env_steps", i, 100.0 * (i + 1), 10 * (i + 1)) for i in range(4)]
    rows += [("eval_return_step_0", 2, -10.0, 35), ("eval_return_step_1", 2, -6.0, 35),
             ("eval_return_step_0", 4, -9.0, 55), ("eval_return_step_1", 4, -4.0, 55)]
    with (folder / "metrics.csv").open("w", encoding="utf-8") as f:
        f.write("key,step,value,timestamp\n")
        f.writelines(f"{k},{s},{v},{t}\n" for k, s, v, t in rows)
    run = ReportRun(run=folder, family="navigation2d", method="maml", k_shot=None,
                    summary=None)
    table = evaluation_history(run)
    assert table["iteration"].tolist() == [2, 4]
    assert table["step_0"].tolist() == [-10.0, -9.0]
    assert table["step_1"].tolist() == [-6.0, -4.0]
    assert table["train_seconds"].tolist() == [1.0 + 2.0, 1.0 + 2.0 + 3.0 + 4.0]
    assert table["env_steps"].tolist() == [100.0 + 200.0, 100.0 + 200.0 + 300.0 + 400.0]
    lines = _evaluation_lines(run, "return")
    assert "| 4 | -9.0 | -4.0 | 10.0 | 1,000 |" in lines
    assert lines[2].startswith("| meta-iteration | return after 0 steps | return after 1 step |")
    assert "and env steps spent before it." in lines[0]

    # without any cost history: no cost columns, and the caption does not name them
    with (folder / "metrics.csv").open("w", encoding="utf-8") as f:
        f.write("key,step,value,timestamp\n")
        f.writelines(f"{k},{s},{v},{t}\n" for k, s, v, t in rows if k.startswith("eval_"))
    run = ReportRun(run=folder, family="navigation2d", method="maml", k_shot=None,
                    summary=None)
    assert evaluation_history(run)[["train_seconds", "env_steps"]].isna().all().all()
    lines = _evaluation_lines(run, "return")
    assert lines[2] == ("| meta-iteration | return after 0 steps | return after 1 step |")
    assert "spent before it" not in lines[0] and "| 2 | -10.0 | -6.0 |" in lines

    # one evaluation only (the final one): no table
    with (folder / "metrics.csv").open("w", encoding="utf-8") as f:
        f.write("key,step,value,timestamp\n")
        f.writelines(f"{k},{s},{v},{t}\n" for k, s, v, t in rows if s != 2)
    run = ReportRun(run=folder, family="navigation2d", method="maml", k_shot=None,
                    summary=None)
    assert len(evaluation_history(run)) == 1 and _evaluation_lines(run, "return") == []


def test_an_export_reads_its_metrics_back_exactly(tmp_path):
    """Values written with all their digits (``repr``) read back bit for bit from
    ``metrics.csv``, whatever pandas' default float parser."""
    import numpy as np
    import yaml

    from flows.runrecord import open_record

    values = np.random.default_rng(0).standard_normal(2000) * np.exp(
        np.random.default_rng(1).uniform(-40, 40, 2000))
    folder = tmp_path / ("cd" * 16)
    folder.mkdir()
    (folder / "run.yaml").write_text(yaml.safe_dump({
        "format": 1, "info": {"run_id": "cd" * 16}, "metrics": {"loss": float(values[-1])}}),
        encoding="utf-8")
    with (folder / "metrics.csv").open("w", encoding="utf-8") as f:
        f.write("key,step,value,timestamp\n")
        f.writelines(f"loss,{i},{float(v)!r},{i}\n" for i, v in enumerate(values))
    history = open_record(folder).history(["loss"])
    assert history["loss"].tolist() == values.tolist()


def test_seed_groups_read_a_key_one_run_lacks_as_its_default(tmp_path):
    """A config key added after a run was made (``inner.step_size_lr``,
    ``inner.step_size_min``: the exported ant-vel run has neither) ran at its default in that
    run: a later seed that logs the default is a seed of it, one that sets it otherwise is
    another config; so are the exported halfcheetah-vel runs with and without the floor."""
    from flows.report import ReportRun, seed_groups

    def params(**added):
        def edit(meta):
            meta["params"].update(added)
        return edit

    runs = [_ant_vel_copy(tmp_path, 0),
            _ant_vel_copy(tmp_path, 1, params(**{"inner.step_size_lr": "null",
                                                 "inner.step_size_min": "null"})),
            _ant_vel_copy(tmp_path, 2, params(**{"inner.step_size_min": "0.0"})),
            _ant_vel_copy(tmp_path, 3, params(**{"inner.step_size_min": "0"}))]
    assert "inner.step_size_min" not in runs[0].run.data.params
    groups = seed_groups(runs)
    assert [[r.run.data.params["seed"] for r in g] for g in groups] == [["0", "1"], ["2", "3"]]

    def exported(run_id: str) -> ReportRun:
        return ReportRun(run=ROOT / "docs" / "results" / "runs" / run_id,
                         family="halfcheetah-vel", method="maml", k_shot=None, summary=None)

    no_floor = exported("09390b00ec644122a63a491ff3f0afe3")
    floor = exported("1fb9f5624e524987b026751374eaa242")
    assert "inner.step_size_min" not in no_floor.run.data.params
    assert seed_groups([no_floor, floor]) == []
