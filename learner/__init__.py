"""Pure JAX learning core: the learner state, the train step, tasks, EWC, evaluation, CL metrics, presets."""

from continuity.learner.compiles import compilation_count
from continuity.learner.config import EWCConfig, LearnerConfig, ModelConfig, ReplayConfig
from continuity.learner.ewc import EWCState
from continuity.learner.learner import Evaluation, Learner, ModelFactory
from continuity.learner.models import cnn, count_parameters, mlp
from continuity.learner.state import Batch, LearnerState, StepTotals
from continuity.learner.tasks import CORRECT, LOSS, Classification, MultiLabel, Outcome, Regression, Task

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
]
