"""Pure JAX learning core: models, the learner state, the train step, EWC, evaluation, CL metrics."""

from continuity.learner.compiles import compilation_count
from continuity.learner.config import EWCConfig, LearnerConfig, ModelConfig, ReplayConfig
from continuity.learner.ewc import EWCState
from continuity.learner.learner import Evaluation, Learner
from continuity.learner.models import build_model, count_parameters
from continuity.learner.state import Batch, LearnerState

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
