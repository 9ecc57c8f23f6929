"""Pure JAX learning core: the learner state, the train step, tasks, EWC, evaluation, CL metrics, presets.

Names are imported on first use (PEP 562), so `continuity.learner.config`, which the
config loader reads, does not pay for (or need) JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from continuity.learner.compiles import compilation_count
    from continuity.learner.config import EWCConfig, LearnerConfig, ModelConfig, ReplayConfig
    from continuity.learner.ewc import EWCState
    from continuity.learner.learner import Evaluation, Learner, ModelFactory
    from continuity.learner.models import cnn, count_parameters, mlp, tree_bytes
    from continuity.learner.state import Batch, LearnerState, StepTotals
    from continuity.learner.tasks import CORRECT, LOSS, Classification, MultiLabel, Outcome, Regression, Task

_HOMES = {
    "compilation_count": "compiles",
    "EWCConfig": "config",
    "LearnerConfig": "config",
    "ModelConfig": "config",
    "ReplayConfig": "config",
    "EWCState": "ewc",
    "Evaluation": "learner",
    "Learner": "learner",
    "ModelFactory": "learner",
    "cnn": "models",
    "count_parameters": "models",
    "mlp": "models",
    "tree_bytes": "models",
    "Batch": "state",
    "LearnerState": "state",
    "StepTotals": "state",
    "CORRECT": "tasks",
    "LOSS": "tasks",
    "Classification": "tasks",
    "MultiLabel": "tasks",
    "Outcome": "tasks",
    "Regression": "tasks",
    "Task": "tasks",
}

__all__ = [
    "CORRECT",
    "LOSS",
    "Batch",
    "Classification",
    "EWCConfig",
    "EWCState",
    "Evaluation",
    "Learner",
    "LearnerConfig",
    "LearnerState",
    "ModelConfig",
    "ModelFactory",
    "MultiLabel",
    "Outcome",
    "Regression",
    "ReplayConfig",
    "StepTotals",
    "Task",
    "cnn",
    "compilation_count",
    "count_parameters",
    "mlp",
    "tree_bytes",
]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
