"""The ``maml`` command line: train, evaluate, baseline, report, export, retrain, schedule,
stage, ui, lineage."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from flows.settings import configure_environment

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # as a shell reports a process stopped by the signal
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's or a container's stop), raised like Ctrl-C.

    Inside a flow run Prefect's own handler turns the signal into its ``TerminationSignal``
    (the training marks its run KILLED), then restores the handler it found, ours, and sends the
    signal again; ours raises this, so that the process ends through Python's exit: the resume
    command is printed, and the temporary Prefect server the process started is stopped by its
    exit hook instead of being left running. Without it the second signal kills the process."""


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises ``Terminated`` in the main thread while this is open (elsewhere no
    change, as signal handlers belong to the main thread; nor where SIGTERM is ignored, or
    handled outside Python). Once it has fired, SIGTERM is ignored until the process exits, so
    that a second one does not cut short the exit it asked for (SIGKILL still ends it)."""
    fired = False

    def handler(signum, frame):
        nonlocal fired
        fired = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(f"signal {signum}")

    previous = None
    if threading.current_thread() is threading.main_thread():
        current = signal.getsignal(signal.SIGTERM)
        if current is not None and current is not signal.SIG_IGN:
            previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if previous is not None and not fired:
            signal.signal(signal.SIGTERM, previous)


def _stopped_run_id(exc: BaseException) -> str | None:
    """The run id ``flows.training.record_stop`` put on the interrupt, found also when a later
    exception (``Terminated`` raised inside Prefect's handling of the first signal) replaced
    it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "maml_run_id", None):
            return exc.maml_run_id
        exc = exc.__cause__ or exc.__context__
    return None


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is answered in one line (no usage block)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())} "
                  f"(see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="maml", description="MAML meta-RL pipeline (Prefect flows, MLflow "
                "lineage)")
    p.add_argument("--verbose", action="store_true", help="show Prefect/MLflow logs and "
                   "full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train from a config")
    t.add_argument("config", nargs="?", help="YAML config (optional with --resume)")
    t.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last "
                   "checkpoint")
    t.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--init-model", help="warm start from a model (e.g. models:/maml-policy"
                   "@champion)")

    e = sub.add_parser("evaluate", help="adaptation curve of a model on a task set")
    e.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, champion, or a "
                   "checkpoint (.json or directory)")
    e.add_argument("--tasks", help="task set (CSV/parquet); default: the model's held-out set")
    e.add_argument("--steps", type=int, default=3, help="adaptation steps (default 3)")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--episodes", type=int, default=None, help="episodes per task and step")
    e.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="evaluate under a changed protocol: override a key "
                   "of the model's recorded config (task.*, inner.step_size, evaluation.*, "
                   "episodes_per_task, gamma, gae_lambda, normalize_advantages, k_shot, device, "
                   "dtype; repeatable), e.g. inner.step_size=0.2, or task.family=ant-vel with "
                   "--tasks data/ant-vel_test_tasks.csv for an ant-dir model")

    b = sub.add_parser("baseline", help="a baseline of the paper (random, pretrained, oracle) "
                       "evaluated like MAML")
    b.add_argument("config", help="YAML config (its evaluation section is the protocol)")
    b.add_argument("--method", required=True, choices=["random", "pretrained", "oracle"],
                   help="random init; one policy pretrained on all tasks; oracle (navigation2d: "
                   "sees the goal)")
    b.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key (repeatable)")
    b.add_argument("--pretrain-iterations", type=int, default=None, metavar="N",
                   help="pretraining iterations (default: the config's iterations)")

    rp = sub.add_parser("report", help="Markdown report of our runs beside the paper's numbers")
    rp.add_argument("--out", default="docs/results", help="folder for README.md and the plots "
                    "(default docs/results)")
    rp.add_argument("--family", dest="families", action="extend", nargs="+", default=[],
                    metavar="F", help="only these task families")
    rp.add_argument("--run", dest="run_ids", action="extend", nargs="+", default=[],
                    metavar="RUN", help="use these meta-train/baseline runs (MLflow run ids, "
                    "or folders written by `maml export`) instead of the latest of their "
                    "family and method; a second run of a family and method is shown beside "
                    "the first as '<method> (<its config>)'. Given only exported runs, the "
                    "report reads nothing from the MLflow store")

    x = sub.add_parser("export", help="write runs' records (metrics, evaluation tables, "
                       "config, model) as plain files that `maml report --run` reads back")
    x.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    x.add_argument("--out", default="docs/results/runs", help="parent folder; each run goes "
                   "to OUT/RUN_ID (default docs/results/runs)")

    r = sub.add_parser("retrain", help="warm-start from the champion, train, promote if better")
    r.add_argument("config")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    s = sub.add_parser("schedule", help="serve the retrain flow on a cron schedule (needs a "
                       "Prefect server)")
    s.add_argument("config")
    s.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *"')
    s.add_argument("--name", default="maml-retrain", help="deployment name")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    g = sub.add_parser("stage", help="run one stage alone on a stored iteration")
    g.add_argument("name", choices=["sample_tasks", "collect_rollouts", "adapt", "meta_update",
                                    "evaluate", "checkpoint"])
    g.add_argument("--run", required=True, metavar="RUN_ID")
    g.add_argument("--iteration", required=True, type=int)
    g.add_argument("--phase", default="pre",
                   help="collect_rollouts: which episodes, pre (theta's), post (the adapted "
                   "policies') or, with inner.fresh_episodes, pre1, pre2, ... (those of the "
                   "policies adapted once, twice, ...); adapt: the inner step on that phase's "
                   "episodes (default: pre)")

    u = sub.add_parser("ui", help="open the MLflow UI for the configured store (127.0.0.1)")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1")

    lin = sub.add_parser("lineage", help="print a model's lineage back to the first training")
    lin.add_argument("model")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a command line argparse rejects (one line, code 2)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    if argv is None:  # the program itself (not a call from Python): it may restart
        from maml_core.allocator import AllocatorError, exec_requested_allocator

        try:
            exec_requested_allocator(sys.argv)
        except AllocatorError as exc:
            print(f"maml {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        configure_environment(verbose=args.verbose)
    except OSError as exc:  # MAML_HOME under a file, on a full or read-only disk, ...
        from flows.settings import maml_home

        print(f"maml {args.command}: error: the local-state folder {str(maml_home())!r} "
              f"(MAML_HOME) cannot be created ({exc.strerror or exc}); set MAML_HOME to a "
              "writable folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    from flows import tracking
    from flows.errors import USER_ERRORS, one_line

    try:
        # every MLflow run this command starts is tagged maml.command = this command line
        with _sigterm_raises(), tracking.recording_command(command_line(argv)):
            return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"maml {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (``Terminated``)
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        run_id = _stopped_run_id(exc)
        hint = f"; resume with `maml train --resume {run_id}`" if run_id else ""
        print(f"maml {args.command}: {what}{hint}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, shell-quoted, with the program shown as ``maml``."""
    return shlex.join(["maml", *(sys.argv[1:] if argv is None else argv)])


def _print_summary(result: dict) -> None:
    import pandas as pd

    table = pd.DataFrame(result["summary"])
    print()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _check_held_out(config) -> None:
    """The config's held-out task set (``task.test_tasks``) is readable and fits its family."""
    if config.task.test_tasks:
        from maml_core.tasksets import load_task_set

        load_task_set(config.task.test_tasks, config.family())


def _check_store_writable() -> None:
    """The stage store's folder can be created and written (``StoreError`` otherwise)."""
    from flows.store import StageStore
    from flows.training import store_root

    StageStore(store_root(), "").ensure_writable()


def _check_model_fits(config, model_ref: str) -> None:
    """``model_ref`` resolves and its parameters fit the policy that ``config`` builds."""
    from flows import tracking
    from maml_core.trainer import MetaLearner

    _, params, _, _ = tracking.load_policy(model_ref)
    learner = MetaLearner(config)
    try:
        learner.load_model_params(params, f"model {model_ref!r}")
    finally:
        learner.close()


def _check_resumable(config, run_id: str) -> None:
    """The resumed run's last checkpoint (if any) loads and fits its config's policy."""
    from flows.store import StageStore
    from flows.training import store_root
    from maml_core.checkpoint import latest_checkpoint
    from maml_core.trainer import MetaLearner

    ckpt = latest_checkpoint(StageStore(store_root(), run_id).checkpoint_dir)
    if ckpt is None:
        return
    import torch

    rng = torch.get_rng_state()  # restore() sets it; the training itself restores it again
    learner = MetaLearner(config)
    try:
        learner.restore(ckpt)
    finally:
        learner.close()
        torch.set_rng_state(rng)


def check_train_inputs(args):
    """Everything ``maml train`` can check before a flow or an MLflow run starts: the config
    (or the resumed run's stored config), its held-out task set, the resumed run and the
    warm-start model."""
    from flows import tracking
    from flows.errors import RUN_ID, USER_ERRORS, UsageError
    from flows.store import StoreError
    from flows.training import resolve_config

    if not args.config and not args.resume:
        raise UsageError("give a config file (e.g. configs/navigation2d.yaml) or --resume RUN_ID")
    if args.config and not Path(args.config).is_file():
        raise UsageError(f"config file {args.config!r} does not exist")
    if args.resume is not None and not RUN_ID.fullmatch(args.resume):
        raise UsageError(f"--resume {args.resume!r} is not a run id (letters, digits, '-' and "
                         "'_'; the MLflow run id that `maml train` printed)")
    try:
        config = resolve_config(args.config, args.overrides or None, None, args.resume)
    except USER_ERRORS:
        raise
    except ValueError as exc:  # e.g. a stored config.json that is not JSON
        if not args.resume:
            raise
        raise StoreError(f"cannot resume run {args.resume!r}: its stored config cannot be "
                         f"read ({type(exc).__name__}: {exc})") from None
    _check_held_out(config)
    _check_store_writable()
    if args.resume:
        _check_resumable(config, args.resume)
    if args.resume or args.init_model:
        tracking.load_tracking_config().setup()
    if args.resume:
        tracking.get_run(args.resume)
    elif args.init_model:
        _check_model_fits(config, args.init_model)
    return config


def cmd_train(args) -> int:
    from flows.training import meta_train

    check_train_inputs(args)
    result = meta_train(config_path=args.config, overrides=args.overrides or None,
                        resume=args.resume, init_model=args.init_model)
    _print_summary(result)
    if result.get("selected_iteration") is not None:
        print(f"\nModel: the one after iteration {result['selected_iteration']} of "
              f"{result['iterations']}, best on the validation tasks "
              "(evaluation.validation_tasks); the table above is its held-out evaluation")
    print(f"\nMLflow run: {result['run_id']}")
    if result.get("model_version"):
        print(f"Registered model: models:/{result['registered_model']}/"
              f"{result['model_version']}")
    print(f"Stage store: {result['store']}")
    print(look_next(result))
    return 0


def look_next(result: dict) -> str:
    """Where to look after a training: the MLflow UI, and the model's lineage when one was
    registered (``pipeline.register_model: false`` registers none)."""
    hint = "Look next: `maml ui` then open http://127.0.0.1:5000 (experiment 'maml')"
    if result.get("model_version"):
        hint += f"; `maml lineage models:/{result['registered_model']}/{result['model_version']}`"
    return hint


def cmd_evaluate(args) -> int:
    from flows.evaluation import check_evaluation_inputs, evaluate_model

    overrides = args.overrides or None
    check_evaluation_inputs(args.model, args.tasks, args.steps, args.seed, args.episodes,
                            overrides)
    result = evaluate_model(args.model, args.tasks, args.steps, args.seed, args.episodes,
                            overrides=overrides)
    _print_summary(result)
    if result.get("selected_iteration") is not None:
        print(f"\nModel: the one after iteration {result['selected_iteration']} of "
              f"{result['iterations']}, best on the validation tasks "
              "(evaluation.validation_tasks); the table above is its held-out evaluation")
    print(f"\nMLflow run: {result['run_id']}")
    return 0


def cmd_baseline(args) -> int:
    from flows.baselines import baseline, check_baseline_inputs

    config = check_baseline_inputs(args.config, args.method, args.overrides or None,
                                   args.pretrain_iterations)
    _check_held_out(config)
    result = baseline(config_path=args.config, method=args.method,
                      overrides=args.overrides or None,
                      pretrain_iterations=args.pretrain_iterations)
    _print_summary(result)
    if args.method == "pretrained":
        steps = (f", {int(result['env_steps']):,} env steps" if "env_steps" in result
                 else "")
        print(f"\nPretraining: {result['pretrain_iterations']} iterations, "
              f"{result['train_seconds']:.1f} s{steps}")
    elif args.method == "oracle":
        print("\nThe oracle sees the goal and does not adapt: the same return at every step.")
    print(f"\nMLflow run: {result['run_id']}")
    return 0


def cmd_report(args) -> int:
    from flows import tracking
    from flows.report import write_report
    from flows.runrecord import check_ref, exports_only

    for ref in args.run_ids:
        check_ref(ref)
    if not exports_only(args.run_ids):
        tracking.load_tracking_config().setup()
    report = write_report(args.out, args.families or None, args.run_ids or None,
                          command=tracking.current_command())
    print(report["compact"])
    print(f"\nReport: {report['path']} ({len(report['images'])} plots)")
    return 0


def cmd_export(args) -> int:
    from flows import tracking
    from flows.errors import UsageError
    from flows.runrecord import ARTIFACTS_DIR, export_run

    bad = [r for r in args.run_ids if not tracking.is_run_id(r)]
    if bad:
        raise UsageError(f"{bad[0]!r} is not an MLflow run id (32 hex digits, as `maml train` "
                         "and `maml baseline` print)")
    tracking.load_tracking_config().setup()
    runs = [tracking.get_run(r) for r in dict.fromkeys(args.run_ids)]  # all exist, first
    for run in runs:
        path = export_run(run.info.run_id, args.out)
        print(f"{run.info.run_id} ({run.info.run_name}, {run.info.status}) -> {path}")
        if run.info.status != "FINISHED":
            print(f"  warning: the run is {run.info.status}; this export is a snapshot: export "
                  "it again once it has finished")
        if not (path / ARTIFACTS_DIR / "evaluation" / "summary.csv").is_file():
            print("  warning: the run has no evaluation/summary.csv, so `maml report` cannot "
                  "show it")
    return 0


def cmd_retrain(args) -> int:
    from flows import tracking
    from flows.config import load_run_config
    from flows.errors import UsageError
    from flows.retrain import retrain

    if not Path(args.config).is_file():
        raise UsageError(f"config file {args.config!r} does not exist")
    config = load_run_config(args.config, args.overrides or None)
    _check_held_out(config)
    tcfg = tracking.load_tracking_config()
    tcfg.setup()
    champion = tracking.get_alias_version(tcfg.registered_model_name, tcfg.aliases.champion)
    if champion is not None:  # the warm start must fit the config's policy
        _check_model_fits(config, f"models:/{champion.name}/{champion.version}")
    decision = retrain(config_path=args.config, overrides=args.overrides or None)
    print(json.dumps(decision, indent=1, default=str))
    return 0


def cmd_schedule(args) -> int:
    from flows.schedule import serve_retrain

    return serve_retrain(args.config, args.cron, args.name, args.overrides)


def cmd_stage(args) -> int:
    from flows.rerun import rerun_stage

    report = rerun_stage(args.name, args.run, args.iteration, args.phase)
    print(json.dumps(report, indent=1, default=str))
    return 0


def cmd_ui(args) -> int:
    from flows import tracking

    uri = tracking.load_tracking_config().tracking_uri
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port)]
    print(f"MLflow UI for {uri} on http://{args.host}:{args.port} (Ctrl-C to stop)")
    os.execv(sys.executable, cmd)
    return 0


def cmd_lineage(args) -> int:
    from flows import tracking

    tracking.load_tracking_config().setup()
    print(tracking.format_lineage(tracking.lineage(args.model)))
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "baseline": cmd_baseline,
            "report": cmd_report, "export": cmd_export, "retrain": cmd_retrain,
            "schedule": cmd_schedule, "stage": cmd_stage, "ui": cmd_ui, "lineage": cmd_lineage}


if __name__ == "__main__":
    sys.exit(main())
