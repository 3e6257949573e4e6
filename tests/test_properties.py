"""Property-based tests (hypothesis) of the two parsers that read what users hand in.

- Config parsing: any mapping -- known keys with values of any type, unknown keys, dotted
  overrides -- gives a ``MAMLConfig`` or a ``ConfigError``, never another exception; a valid
  config survives ``model_dump(mode="json")`` -> ``build_config`` unchanged.
- Task-set loading: any table or CSV text, as CSV or parquet, gives a valid task table (unique
  integer task ids, finite parameters) or a ``TaskSetError``, never another exception; a valid
  table survives ``save_task_set`` -> ``load_task_set`` unchanged.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maml_core.config import ConfigError, MAMLConfig, build_config
from maml_core.tasks import get_task_family
from maml_core.tasksets import TaskSetError, load_task_set, save_task_set

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------ config parsing
KNOWN = {
    "": ["seed", "device", "dtype", "iterations", "meta_batch_size", "episodes_per_task",
         "gamma", "gae_lambda", "normalize_advantages", "k_shot", "checkpoint_every"],
    "task": ["family", "horizon", "options", "test_tasks"],
    "policy": ["hidden_sizes", "activation", "init_log_std", "min_log_std"],
    "inner": ["step_size", "num_steps", "first_order", "learn_step_size", "step_size_per",
              "step_size_lr", "step_size_min", "episodes_per_task"],
    "meta_optimizer": ["name", "lr", "max_grad_norm", "max_kl", "cg_iters", "cg_damping",
                       "line_search_steps", "line_search_backtrack", "hvp_subsample",
                       "clip_eps", "epochs", "max_rejected_updates"],
    "evaluation": ["every", "num_tasks", "steps", "episodes_per_task", "seed",
                   "later_step_scale"],
}
OPTION_NAMES = ["low", "high", "max_action", "goal_tolerance", "terminate_at_goal", "amp_low",
                "amp_high", "phase_low", "phase_high", "num_states", "num_actions",
                "objective", "include_contact_forces", "bogus"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["cpu", "cuda", "tpu", "float32", "float64", "tanh", "relu", "adam",
                     "trpo", "sgd", "promp", "navigation2d", "sinusoid", "tabular-mdp",
                     "ant-vel", "1e-3", "nan", "-1"]),
)
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
options = st.dictionaries(st.one_of(st.sampled_from(OPTION_NAMES), st.text(max_size=5)),
                          anything, max_size=3)


@st.composite
def messy_configs(draw) -> dict:
    data: dict = {}
    for section, keys in KNOWN.items():
        chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
        if section and not chosen and draw(st.booleans()):
            data[section] = draw(anything)  # a section that is not a mapping
            continue
        node = data if not section else data.setdefault(section, {})
        for key in chosen:
            node[key] = draw(options if key == "options" else anything)
    for _ in range(draw(st.integers(0, 2))):  # unknown keys, at the top or in a section
        where = draw(st.sampled_from(list(KNOWN)))
        node = data if not where else data.setdefault(where, {})
        if isinstance(node, dict):
            node[draw(st.one_of(st.text(max_size=6), st.integers()))] = draw(anything)
    return data


override_keys = st.one_of(
    st.sampled_from([f"{s}.{k}" if s else k for s, ks in KNOWN.items() for k in ks]),
    st.sampled_from(["task.options.low", "task.options.bogus", "inner", "seed.x", "", "a..b",
                     "iteratons"]),
    st.text(max_size=10))
_assign = st.builds(lambda k, v: f"{k}={v}", override_keys, st.one_of(
    st.text(max_size=12),
    st.sampled_from(["0", "-1", "1.5", "[]", "[64, -1]", "{a: 1}", "!!python/object:os.system x",
                     "[1", "null", ".nan", ".inf", "true", "adam", "'quoted'"])))
overrides = st.lists(st.one_of(_assign, st.text(max_size=12)), max_size=3)

@st.composite
def mutated_configs(draw) -> dict:
    """A valid config with one or two keys set to anything (or an unknown key added)."""
    data = draw(valid_configs())
    for _ in range(draw(st.integers(1, 2))):
        section = draw(st.sampled_from(list(KNOWN)))
        node = data if not section else data.setdefault(section, {})
        key = draw(st.one_of(st.sampled_from(KNOWN[section]), st.text(max_size=5)))
        node[key] = draw(options if key == "options" else anything)
    return data


@SETTINGS
@given(data=st.one_of(messy_configs(), st.deferred(lambda: mutated_configs())),
       extra=overrides)
def test_config_parsing_gives_a_config_or_a_config_error(data, extra):
    try:
        cfg = build_config(data, extra)
    except ConfigError as exc:
        assert str(exc)  # a message, never empty
        return
    assert isinstance(cfg, MAMLConfig)


@SETTINGS
@given(data=st.one_of(anything, st.lists(anything)))
def test_config_that_is_not_a_mapping_is_a_config_error(data):
    if isinstance(data, dict):
        return
    with pytest.raises(ConfigError):
        build_config(data)


positive_float = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False,
                           allow_infinity=False)
unit_open = st.floats(min_value=1e-6, max_value=1 - 1e-6)
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def _ordered_pair(lo: float, hi: float, strict: bool):
    return st.tuples(st.floats(lo, hi), st.floats(lo, hi)).filter(
        lambda p: p[0] < p[1] if strict else p[0] <= p[1])


@st.composite
def family_and_options(draw) -> tuple[str, dict]:
    family = draw(st.sampled_from(["navigation2d", "sinusoid", "tabular-mdp"]))
    opts: dict = {}
    if family == "navigation2d":
        if draw(st.booleans()):
            opts["low"], opts["high"] = draw(_ordered_pair(-5, 5, strict=True))
        if draw(st.booleans()):
            opts["max_action"] = draw(positive_float)
        if draw(st.booleans()):
            opts["terminate_at_goal"] = draw(st.booleans())
    elif family == "sinusoid":
        if draw(st.booleans()):
            opts["amp_low"], opts["amp_high"] = draw(_ordered_pair(0, 10, strict=False))
    elif draw(st.booleans()):
        opts["num_states"] = draw(st.integers(1, 20))
        opts["num_actions"] = draw(st.integers(1, 10))
    return family, opts


def _maybe(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def valid_configs(draw) -> dict:
    family, opts = draw(family_and_options())
    top = draw(st.fixed_dictionaries({}, optional={
        "seed": st.integers(0, 2**62), "device": st.just("cpu"),
        "dtype": st.sampled_from(["float32", "float64"]), "iterations": st.integers(1, 10**6),
        "meta_batch_size": st.integers(1, 1000), "episodes_per_task": st.integers(1, 1000),
        "gamma": st.floats(1e-6, 1), "gae_lambda": st.floats(0, 1),
        "normalize_advantages": st.booleans(), "k_shot": st.integers(1, 100),
        "checkpoint_every": st.integers(1, 100)}))
    names = ["adam", "sgd", "promp"] + (["trpo"] if family != "sinusoid" else [])
    top["task"] = {"family": family, "options": opts, **draw(st.fixed_dictionaries({}, optional={
        "horizon": _maybe(st.integers(1, 1000)),
        "test_tasks": _maybe(st.text(min_size=1, max_size=12))}))}
    top["policy"] = draw(st.fixed_dictionaries({}, optional={
        "hidden_sizes": st.lists(st.integers(1, 512), min_size=1, max_size=4),
        "activation": st.sampled_from(["tanh", "relu"]), "init_log_std": finite}))
    top["inner"] = draw(st.fixed_dictionaries({}, optional={
        "step_size": positive_float, "num_steps": st.integers(1, 5),
        "first_order": st.booleans(), "learn_step_size": st.booleans()}))
    top["meta_optimizer"] = draw(st.fixed_dictionaries({"name": st.sampled_from(names)},
                                                       optional={
        "lr": positive_float, "max_grad_norm": _maybe(positive_float), "max_kl": positive_float,
        "cg_iters": st.integers(1, 50), "cg_damping": st.floats(0, 1),
        "line_search_steps": st.integers(1, 30), "line_search_backtrack": unit_open,
        "hvp_subsample": st.floats(1e-3, 1), "clip_eps": unit_open,
        "epochs": st.integers(1, 10), "max_rejected_updates": st.integers(1, 10)}))
    top["evaluation"] = draw(st.fixed_dictionaries({}, optional={
        "every": st.integers(0, 100), "num_tasks": st.integers(1, 100),
        "steps": st.integers(0, 5), "episodes_per_task": _maybe(st.integers(1, 100)),
        "seed": st.integers(0, 2**31)}))
    return top


@SETTINGS
@given(data=valid_configs())
def test_valid_config_round_trips(data):
    cfg = build_config(data)
    assert cfg.task.family == data["task"]["family"]
    again = build_config(cfg.model_dump(mode="json"))
    assert again == cfg
    assert again.model_dump(mode="json") == cfg.model_dump(mode="json")


# ------------------------------------------------------------------------------ task sets
NAV = get_task_family("navigation2d")
COLUMNS = ["task_id", "goal_x", "goal_y", "extra"]

cell_float = st.floats(allow_nan=True, allow_infinity=True)
column_values = st.one_of(
    st.lists(st.integers(-5, 5), min_size=0, max_size=6),
    st.lists(st.integers(), max_size=6),
    st.lists(cell_float, max_size=6),
    st.lists(st.floats(-1, 1), max_size=6),
    st.lists(st.booleans(), max_size=6),
    st.lists(st.text(max_size=5), max_size=6),
    st.lists(st.one_of(st.none(), st.integers(-3, 3), st.floats(-1, 1), st.text(max_size=3)),
             max_size=6),
)


@st.composite
def messy_tables(draw) -> pd.DataFrame:
    names = draw(st.lists(st.one_of(st.sampled_from(COLUMNS), st.text(max_size=4)),
                          unique=True, max_size=5))
    n = draw(st.integers(0, 6))
    data = {}
    for name in names:
        values = draw(column_values) or [None]
        data[name] = (values * (n // len(values) + 1))[:n]
    return pd.DataFrame(data)


def _assert_valid(tasks: pd.DataFrame) -> None:
    assert isinstance(tasks, pd.DataFrame) and len(tasks) >= 1
    ids = tasks["task_id"].tolist()
    assert len(set(ids)) == len(ids)
    assert all(not isinstance(i, bool) and float(i).is_integer() for i in ids)
    params = tasks[list(NAV.task_params)].to_numpy(dtype=np.float64)
    assert np.isfinite(params).all()
    assert list(tasks.index) == list(range(len(tasks)))


def _load_or_error(path: Path) -> None:
    try:
        tasks = load_task_set(path, NAV)
    except TaskSetError as exc:
        assert str(path) in str(exc)
        return
    _assert_valid(tasks)


@st.composite
def mutated_tables(draw) -> pd.DataFrame:
    """A valid table with a few things broken (or not): a column dropped, renamed or refilled,
    a cell set to NaN/inf/text/None, a row duplicated, all rows removed."""
    table = draw(valid_tables()).astype(object)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["drop", "rename", "refill", "cell", "dup", "empty"]))
        column = draw(st.sampled_from(list(table.columns))) if len(table.columns) else None
        if column is None:
            break
        if kind == "drop":
            table = table.drop(columns=[column])
        elif kind == "rename":
            table = table.rename(columns={column: draw(st.text(max_size=4))})
        elif kind == "refill":
            values = draw(column_values) or [None]
            table[column] = (values * (len(table) // len(values) + 1))[:len(table)]
        elif kind == "cell" and len(table):
            row = draw(st.integers(0, len(table) - 1))
            table[column] = table[column].astype(object)
            table.loc[row, column] = draw(st.one_of(
                st.sampled_from([np.nan, np.inf, -np.inf, None, "x", "", True, 0.5, 2**70]),
                cell_float))
        elif kind == "dup" and len(table):
            table = pd.concat([table, table.iloc[:1]], ignore_index=True)
        elif kind == "empty":
            table = table.iloc[:0]
    return table


@SETTINGS
@given(table=st.one_of(messy_tables(), st.deferred(lambda: mutated_tables())))
def test_any_table_loads_valid_or_is_a_task_set_error(table):
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "tasks.csv"
        csv.write_text(table.to_csv(index=False))
        _load_or_error(csv)
        parquet = Path(tmp) / "tasks.parquet"
        try:
            parquet.write_bytes(table.to_parquet(index=False))
        except Exception:  # pyarrow cannot store every mixed column; nothing to load then
            return
        _load_or_error(parquet)


@SETTINGS
@given(text=st.one_of(
    st.text(max_size=60),
    st.lists(st.lists(st.one_of(st.sampled_from(["task_id", "goal_x", "goal_y", "nan", "inf",
                                                 "-inf", "", "1", "0.5", "x", '"', "1e400"]),
                                st.text(max_size=4)), max_size=4), max_size=5).map(
        lambda rows: "\n".join(",".join(r) for r in rows)),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_any_csv_text_loads_valid_or_is_a_task_set_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tasks.csv"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        _load_or_error(path)
        junk = Path(tmp) / "tasks.parquet"
        junk.write_bytes(text.encode("utf-8", "surrogatepass"))
        _load_or_error(junk)


@st.composite
def valid_tables(draw) -> pd.DataFrame:
    n = draw(st.integers(1, 8))
    ids = draw(st.lists(st.integers(-(2**62), 2**62), min_size=n, max_size=n, unique=True))
    coords = st.floats(allow_nan=False, allow_infinity=False, width=64)
    table = pd.DataFrame({"task_id": np.array(ids, dtype=np.int64),
                          "goal_x": np.array(draw(st.lists(coords, min_size=n, max_size=n))),
                          "goal_y": np.array(draw(st.lists(coords, min_size=n, max_size=n)))})
    if draw(st.booleans()):
        table["difficulty"] = np.array(draw(st.lists(st.integers(0, 9), min_size=n,
                                                     max_size=n)), dtype=np.int64)
    return table


@SETTINGS
@given(table=valid_tables(), suffix=st.sampled_from([".csv", ".parquet"]))
def test_valid_table_round_trips(table, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = save_task_set(table, Path(tmp) / f"tasks{suffix}")
        loaded = load_task_set(path, NAV)
    pd.testing.assert_frame_equal(loaded, table, check_exact=True)

