"""Pure JAX learning core: models, the learner state, the train step, EWC, evaluation, CL metrics."""

from learner.compiles import compilation_count
from learner.config import EWCConfig, LearnerConfig, ModelConfig, ReplayConfig
from learner.ewc import EWCState
from learner.learner import Evaluation, Learner
from learner.models import build_model, count_parameters
from learner.state import Batch, LearnerState

__all__ = [
    "Batch",
    "EWCConfig",
    "EWCState",
    "Evaluation",
    "Learner",
    "LearnerConfig",
    "LearnerState",
    "ModelConfig",
    "ReplayConfig",
    "build_model",
    "compilation_count",
    "count_parameters",
]
