"""Typed, validated configuration, loaded from YAML with ``yaml.safe_load``.

Unknown keys and invalid values are rejected with a message that names the key. Overrides use
dotted keys (``inner.step_size=0.05``) whose values are parsed as YAML scalars.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TaskConfig(_Strict):
    family: str = "navigation2d"
    horizon: int | None = Field(None, ge=1, description="episode length; family default if unset")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="family-specific constructor options")
    test_tasks: str | None = Field(None, description="CSV/parquet of held-out tasks")

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        from maml_core.tasks import task_family_names

        if value not in task_family_names():
            raise ValueError(f"unknown task family {value!r}; known: {task_family_names()}")
        return value


class PolicyConfig(_Strict):
    hidden_sizes: list[int] = Field(default_factory=lambda: [64, 64])
    activation: Literal["tanh", "relu"] = "tanh"
    init_log_std: float = 0.0
    min_log_std: float | None = Field(
        None, description="lower bound on the Gaussian policy's log std (rllab's min_std); "
        "None: unbounded")

    @field_validator("hidden_sizes")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(h < 1 for h in value):
            raise ValueError("hidden_sizes must be a non-empty list of positive integers")
        return value

    @model_validator(mode="after")
    def _std_bound(self) -> PolicyConfig:
        if self.min_log_std is not None and self.min_log_std > self.init_log_std:
            raise ValueError(
                f"policy.min_log_std ({self.min_log_std}) is above policy.init_log_std "
                f"({self.init_log_std}): the log std would start clamped and never get a "
                "gradient; lower min_log_std or raise init_log_std")
        return self


class InnerConfig(_Strict):
    step_size: float = Field(0.1, gt=0, description="alpha, the inner step size")
    num_steps: int = Field(1, ge=1)
    first_order: bool = False
    learn_step_size: bool = Field(False, description="Meta-SGD: learn the step sizes")
    step_size_per: Literal["weight", "layer"] = Field(
        "weight", description="with learn_step_size: one step size per weight (Meta-SGD), or "
        "one per parameter tensor")
    step_size_lr: float | None = Field(
        None, gt=0, description="with learn_step_size and TRPO: Adam's learning rate for the "
        "step sizes, which are then updated apart from TRPO's KL-bounded step (None: TRPO "
        "updates them with the policy)")
    step_size_min: float | None = Field(
        None, description="with step_size_lr: a floor for the learned step sizes, which are "
        "clamped to it after each of their Adam steps (e.g. 0 keeps them from turning "
        "negative; None: no floor)")
    fresh_episodes: bool = Field(
        False, description="with num_steps > 1: sample fresh episodes before every inner step "
        "(step k with the policy adapted k times, step size alpha then alpha / 2), as the "
        "evaluation adapts, and differentiate through all steps; off: every step reuses the "
        "pre-adaptation episodes")
    every_step_objective: bool = Field(
        False, description="with fresh_episodes: the meta-loss is the mean of the losses after "
        "each inner step, each on the episodes its policy sampled (off: after the last step "
        "only); TRPO's max_kl then bounds the mean of the steps' KL divergences")
    episodes_per_task: int | None = Field(
        None, ge=1, description="episodes per task that the inner steps adapt on in "
        "meta-training (the pre-update episodes, and each fresh set with fresh_episodes); "
        "None: episodes_per_task, which the post-update episodes of the meta-loss keep. The "
        "evaluation adapts on evaluation.episodes_per_task either way")


class MetaOptimizerConfig(_Strict):
    name: Literal["adam", "sgd", "trpo", "promp"] = "trpo"
    lr: float = Field(1e-3, gt=0, description="beta, for adam/sgd/promp")
    max_grad_norm: float | None = Field(None, gt=0)
    # TRPO
    max_kl: float = Field(0.01, gt=0)
    cg_iters: int = Field(10, ge=1)
    cg_damping: float = Field(1e-5, ge=0)
    line_search_steps: int = Field(15, ge=1)
    line_search_backtrack: float = Field(0.8, gt=0, lt=1)
    hvp_subsample: float = Field(1.0, gt=0, le=1,
                                 description="fraction of tasks in the Hessian-vector products")
    # ProMP-style clipped surrogate
    clip_eps: float = Field(0.3, gt=0, lt=1)
    epochs: int = Field(5, ge=1)
    # Patience for rejected updates (NaN/Inf gradients or failed line searches in a row).
    max_rejected_updates: int = Field(5, ge=1)


# The paper's test scripts take alpha / 2 for every adaptation step after the first.
PAPER_LATER_STEP_SCALE = 0.5


class EvaluationConfig(_Strict):
    every: int = Field(10, ge=0, description="evaluate every N iterations (0: never)")
    num_tasks: int = Field(40, ge=1)
    steps: int = Field(3, ge=0, description="adaptation steps in the curve (0..steps)")
    episodes_per_task: int | None = Field(None, ge=1, description="default: training value")
    seed: int = 1234
    validation_tasks: int = Field(
        0, ge=0, description="model selection: at every evaluation, also adapt on this many "
        "validation tasks (a seeded draw of their own, with episodes of their own) and keep "
        "the model that did best there; 0: the last iterate is the model")
    select_steps: int = Field(
        1, ge=1, description="the validation score is the mean return (supervised: minus the "
        "MSE) after 1..select_steps adaptation steps")
    later_step_scale: float = Field(
        PAPER_LATER_STEP_SCALE, gt=0, description="RL families: every adaptation step after "
        "the first takes this times alpha (learned step sizes are scaled alike); 0.5 is the "
        "paper's test protocol. Supervised families take alpha at every step")


class MAMLConfig(_Strict):
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    iterations: int = Field(100, ge=1)
    meta_batch_size: int = Field(20, ge=1, description="tasks per meta-iteration")
    episodes_per_task: int = Field(20, ge=1, description="episodes per task per adaptation step")
    gamma: float = Field(0.99, gt=0, le=1)
    gae_lambda: float = Field(1.0, ge=0, le=1)
    normalize_advantages: bool = True
    k_shot: int = Field(10, ge=1, description="supervised families: examples per task")
    checkpoint_every: int = Field(10, ge=1)
    task: TaskConfig = Field(default_factory=TaskConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    inner: InnerConfig = Field(default_factory=InnerConfig)
    meta_optimizer: MetaOptimizerConfig = Field(default_factory=MetaOptimizerConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _check_family(self) -> MAMLConfig:
        from maml_core.tasks import get_task_family

        try:  # validates options; an unknown option is a TypeError from the constructor
            family = get_task_family(self.task.family, **self.task.options)
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise ValueError(f"task.options: {exc}{_accepted_options(self.task.family)}"
                             ) from None
        family.check_environment()  # e.g. MAML_ENV_THREADS: a clear error before any work
        for key in ("fresh_episodes", "episodes_per_task"):
            if family.kind == "supervised" and getattr(self.inner, key):
                raise ValueError(f"inner.{key}: supervised families adapt on their support "
                                 f"set ({self.task.family} samples no episodes; k_shot sets "
                                 "its size); leave it out")
        ev = self.evaluation
        if ev.validation_tasks and not ev.every:
            raise ValueError("evaluation.validation_tasks selects among the models validated "
                             "every evaluation.every iterations: set evaluation.every > 0 "
                             "with it, or leave it out")
        inner = self.inner
        if inner.every_step_objective and not (inner.fresh_episodes and inner.num_steps > 1):
            raise ValueError("inner.every_step_objective scores each inner step on the episodes "
                             "its policy sampled: set inner.fresh_episodes: true and "
                             "inner.num_steps > 1 with it, or leave it out")
        if inner.step_size_lr is not None and not (inner.learn_step_size
                                                   and self.meta_optimizer.name == "trpo"):
            raise ValueError("inner.step_size_lr updates learned step sizes apart from TRPO: "
                             "set inner.learn_step_size: true and meta_optimizer.name: trpo "
                             "with it, or leave it out")
        if inner.step_size_min is not None:
            if inner.step_size_lr is None:
                raise ValueError("inner.step_size_min floors the step sizes that "
                                 "inner.step_size_lr updates: set inner.step_size_lr with it, "
                                 "or leave it out")
            if inner.step_size_min > inner.step_size:
                raise ValueError(f"inner.step_size_min ({inner.step_size_min}) is above "
                                 f"inner.step_size ({inner.step_size}), where the learned sizes "
                                 "start: lower step_size_min or raise step_size")
        if inner.step_size_per != "weight" and not inner.learn_step_size:
            raise ValueError("inner.step_size_per shapes learned step sizes: set "
                             "inner.learn_step_size: true with it, or leave it out")
        if family.kind == "supervised" and self.meta_optimizer.name == "trpo":
            raise ValueError("meta_optimizer.name: trpo needs a policy; supervised families "
                             f"({self.task.family}) take adam or sgd")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device: cuda was asked for but torch sees no CUDA device; "
                                 "set device: cpu")
        return self

    def family(self):
        from maml_core.tasks import get_task_family

        return get_task_family(self.task.family, **self.task.options)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def _accepted_options(name: str) -> str:
    """``" (options of <family>: a, b)"`` from the family's constructor, or ``""``."""
    import inspect

    from maml_core.tasks.base import _REGISTRY

    try:
        params = inspect.signature(_REGISTRY[name].__init__).parameters
    except (KeyError, TypeError, ValueError):
        return ""
    names = [p for p, v in params.items() if p != "self"
             and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
    return f" (options of {name}: {', '.join(names) or 'none'})"


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/ for the valid keys)"
        elif isinstance(e.get("input"), str | int | float | bool) and key:
            shown = repr(e["input"])
            msg += f" (got {shown if len(shown) <= 40 else shown[:37] + '...'})"
        lines.append(f"{key}: {msg}" if key else msg)
    return "invalid configuration: " + "; ".join(lines)


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"override key {key!r} is not a dotted key like inner.step_size")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value "
                              "(e.g. inner.step_size=0.05)")
        key, raw = item.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(raw)))
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML "
                              f"({_yaml_problem(exc)}); quote strings, e.g. "
                              f"{key.strip()}='\"...\"'") from None
    return out


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """YAML's error in one line: what is wrong and where."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: "
                          f"{_yaml_problem(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a text (YAML) file") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read "
                          f"({exc.strerror or exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


def build_config(data: dict, overrides: list[str] | None = None,
                 model: type[MAMLConfig] = MAMLConfig) -> MAMLConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"a configuration must be a mapping of keys to values, got "
                          f"{type(data).__name__}")
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides):
        set_dotted(data, key, value)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def _resolve_relative(config: MAMLConfig, config_path: Path) -> MAMLConfig:
    """Make ``task.test_tasks`` absolute: relative to the working directory if it is there,
    else to the config file's folder or the folder above it (``configs/`` beside ``data/``)."""
    given = config.task.test_tasks
    if not given or Path(given).is_absolute():
        return config
    here = config_path.resolve().parent
    for base in (Path.cwd(), here, here.parent):
        if (base / given).is_file():
            config.task.test_tasks = str((base / given).resolve())
            return config
    raise ConfigError(f"task.test_tasks: {given!r} was found neither in the working directory "
                      f"nor beside {str(config_path)!r}; give an existing CSV/parquet file")


def load_config(path: str | Path, overrides: list[str] | None = None,
                model: type[MAMLConfig] = MAMLConfig) -> MAMLConfig:
    """Read, override and validate a YAML config; relative task-set paths become absolute."""
    return _resolve_relative(build_config(read_yaml(path), overrides, model), Path(path))
