"""Task families. Importing this package registers the built-in ones."""

from maml_core.tasks import (  # noqa: F401
    mujoco,
    navigation,
    sinusoid,
    tabular,
)
from maml_core.tasks.base import (
    TASK_ID,
    TaskFamily,
    TaskVectorEnv,
    get_task_family,
    register_task_family,
    task_family_names,
)

__all__ = [
    "TASK_ID",
    "TaskFamily",
    "TaskVectorEnv",
    "get_task_family",
    "register_task_family",
    "task_family_names",
]
