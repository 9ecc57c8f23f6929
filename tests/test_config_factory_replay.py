"""A model of the user's own, named in the config by import path, trains through `continuity replay`."""

from __future__ import annotations

import jax
import pytest
from conftest import record_scenario
from flax import nnx

from continuity.checkpoints import CheckpointStore
from continuity.cli import main
from continuity.config import load_config
from continuity.factory import learner_from_config

pytestmark = pytest.mark.slow  # a recorded stream through the CLI's replay


def two_layers(*, rngs: nnx.Rngs, inputs, outputs: int, width: int) -> nnx.Module:
    """The user's model: nothing in the package knows it."""
    return nnx.Sequential(
        lambda x: x.reshape(x.shape[0], -1),
        nnx.Linear(int(inputs.size), width, rngs=rngs),
        nnx.relu,
        nnx.Linear(width, outputs, rngs=rngs),
    )


def test_a_model_named_by_import_path_trains_through_the_replay_command(tmp_path, capsys):
    recording = record_scenario(tmp_path / "stream.parquet", segments=2, seed=1)
    overrides = [
        f"model.factory={__name__}:two_layers",
        "model.kwargs.width=24",
        'learner.optimizer="adamw"',
        "learner.optimizer_args.weight_decay=0.0001",
        "learner.clip_global_norm=5.0",
        "probe.every_examples=1000",
        f"checkpoints.dir={tmp_path / 'run'}",
    ]
    arguments = ["replay", str(recording)]
    for override in overrides:
        arguments += ["--set", override]
    assert main(arguments) == 0, capsys.readouterr().err
    config = load_config(None, overrides, environ={})
    like = learner_from_config(config).init(0)
    restored = CheckpointStore(config.checkpoints.dir, create=False).restore_latest(state_like=like)
    assert restored is not None
    shapes = {tuple(leaf.shape) for leaf in jax.tree.leaves(restored.state.params)}
    assert (64, 24) in shapes and (24, 10) in shapes
