"""Models of one's own: defined here (not presets), built by factories, trained by the loop.

One takes named features, int32 token ids and float32 numbers, and embeds the ids: the
ids must reach it as integers, through batches, replay, the probe and checkpoints. The
wire formats do not carry named features yet, so its stream goes through a codec of the
tests' own (tests/named_codec.py). The other takes the digits and trains over a recorded
Parquet stream read exactly as `continuity replay` reads one (service.build_stream).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import record_scenario
from flax import nnx

from continuity import replay
from continuity.checkpoints import CheckpointStore
from continuity.config import load_config
from continuity.guard import GuardConfig
from continuity.learner import Classification, EWCConfig, Learner
from continuity.loop import StreamInput, TrainingLoop, params_digest
from continuity.probe import ProbeConfig
from continuity.service import build_stream
from continuity.stream import MemoryDeadLetters, ScenarioSource
from continuity.stream.scenarios import Scenario, Segment

sys.path.insert(0, str(Path(__file__).parent))
from named_codec import NamedFeaturesCodec, structured, unstructured

pytestmark = pytest.mark.slow  # streams through the training loop

TOKENS, NUMERIC, VOCAB, CLASSES = 6, 3, 30, 3
NAMED_INPUTS = {
    "tokens": jax.ShapeDtypeStruct((TOKENS,), jnp.int32),
    "numeric": jax.ShapeDtypeStruct((NUMERIC,), jnp.float32),
}
SEEN_DTYPES: list[dict] = []  # what each trace of TokensAndNumbers was handed


class TokensAndNumbers(nnx.Module):
    """A bag of token embeddings plus a dense view of the numbers, then a dense head."""

    def __init__(self, vocab: int, dim: int, numeric: int, outputs: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.numeric = nnx.Linear(numeric, dim, rngs=rngs)
        self.head = nnx.Linear(dim, outputs, rngs=rngs)

    def __call__(self, x: dict) -> jax.Array:
        SEEN_DTYPES.append({name: value.dtype for name, value in x.items()})
        bag = self.embed(x["tokens"]).mean(axis=1)  # an embedding lookup: integer ids only
        return self.head(jax.nn.relu(bag + self.numeric(x["numeric"])))


def tokens_and_numbers(*, rngs: nnx.Rngs, inputs: dict, outputs: int, dim: int = 8) -> TokensAndNumbers:
    """A model factory, as a user writes one: the feature structure decides the layer sizes."""
    return TokensAndNumbers(VOCAB, dim, inputs["numeric"].shape[0], outputs, rngs=rngs)


def token_examples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c draws most of its tokens from ids [10c, 10c + 10) and numbers around c."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n).astype(np.int32)
    own = 10 * y[:, None] + rng.integers(0, 10, (n, TOKENS))
    noise = rng.integers(0, VOCAB, (n, TOKENS))
    tokens = np.where(rng.random((n, TOKENS)) < 0.7, own, noise).astype(np.int32)
    numeric = (y[:, None] + rng.normal(0, 1, (n, NUMERIC))).astype(np.float32)
    return structured({"tokens": tokens, "numeric": numeric}), y


def token_scenario(seed: int = 0) -> Scenario:
    segments = []
    for k, name in enumerate(("early", "late")):
        train_x, train_y = token_examples(900, seed * 10 + k)
        test_x, test_y = token_examples(300, seed * 10 + k + 5)
        segments.append(Segment(name, train_x, train_y, test_x, test_y))
    return Scenario("tokens", tuple(segments), CLASSES, (TOKENS,), seed)


def _named_learner() -> Learner:
    return Learner(
        tokens_and_numbers,
        optax.adam(1e-2),
        Classification(CLASSES),
        inputs=NAMED_INPUTS,
        batch_size=16,
        replay=replay.reservoir(128),
        replay_batch_size=16,
        ewc=EWCConfig(enabled=True, strength=10.0, fisher_samples=64),
    )


def test_named_features_keep_int32_token_ids_into_a_user_model_through_the_loop_and_its_checkpoints(tmp_path):
    scenario = token_scenario()
    codec = NamedFeaturesCodec(NAMED_INPUTS, jax.ShapeDtypeStruct((), jnp.int32))
    stream = StreamInput(
        open_source=lambda positions: ScenarioSource(scenario, codec, start=positions),
        codec=codec,
        dead_letters=MemoryDeadLetters(),
        quarantine=MemoryDeadLetters(),
    )
    learner = _named_learner()
    SEEN_DTYPES.clear()
    store = CheckpointStore(tmp_path)
    loop = TrainingLoop(
        stream, learner, store, probe=ProbeConfig(holdout_fraction=0.1), guard=GuardConfig(every_examples=300), seed=0
    )
    summary = loop.run()
    assert summary.accepted >= 4 and summary.dead_letters == 0
    # Every trace (train step, evaluation, Fisher) handed the model integer ids.
    assert SEEN_DTYPES and all(seen == {"tokens": jnp.int32, "numeric": jnp.float32} for seen in SEEN_DTYPES)
    assert loop.final_state.replay.x["tokens"].dtype == jnp.int32
    accuracy = [
        learner.evaluate(loop.final_state.params, unstructured(s.test_x), s.test_y).accuracy for s in scenario.segments
    ]
    assert min(accuracy) > 0.7  # chance is 1/3
    # The checkpoint holds the ids as integers too: the replay buffer and the probe store.
    restarted = TrainingLoop(
        stream, learner, store, probe=ProbeConfig(holdout_fraction=0.1), guard=GuardConfig(every_examples=300), seed=0
    )
    state, good = restarted._restore_or_start()
    store.close()
    assert params_digest(state) == params_digest(loop.final_state)
    assert state.replay.x["tokens"].dtype == jnp.int32
    x, y, _ = good.probe.examples()
    assert x["tokens"].dtype == np.int32 and x["numeric"].dtype == np.float32 and len(y) > 100


class ResidualMLP(nnx.Module):
    """A dense layer, a layer-normed residual block and a head: nothing the presets build."""

    def __init__(self, features: int, width: int, outputs: int, *, rngs: nnx.Rngs):
        self.inner = nnx.Linear(features, width, rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.block = nnx.Linear(width, width, rngs=rngs)
        self.head = nnx.Linear(width, outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.inner(x.reshape(x.shape[0], -1)))
        h = h + jax.nn.relu(self.block(self.norm(h)))
        return self.head(h)


def residual_mlp(*, rngs: nnx.Rngs, inputs: jax.ShapeDtypeStruct, outputs: int, width: int = 64) -> ResidualMLP:
    return ResidualMLP(int(np.prod(inputs.shape)), width, outputs, rngs=rngs)


def test_a_user_model_trains_through_the_replay_commands_stream_of_a_recorded_file(tmp_path):
    recording = record_scenario(tmp_path / "stream.parquet", segments=2, seed=1)
    config = load_config(None, [f"checkpoints.dir={tmp_path / 'run'}"], environ={})
    learner = Learner(
        residual_mlp,
        optax.adamw(3e-3, weight_decay=1e-4),  # any optax transformation
        Classification(config.stream.num_classes),
        inputs=jax.ShapeDtypeStruct(config.stream.feature_shape, jnp.float32),
        batch_size=config.learner.batch_size,
        replay=replay.reservoir(512),
        replay_batch_size=32,
        ewc=config.learner.ewc,
    )
    stream = build_stream(config, recording=recording)  # what `continuity replay FILE` reads
    store = CheckpointStore(config.checkpoints.dir)
    loop = TrainingLoop(
        stream, learner, store, probe=config.probe, guard=replace(config.guard, every_examples=1000), seed=0
    )
    summary = loop.run()
    store.close()
    assert summary.windows >= 2 and summary.accepted >= 1 and summary.last_checkpoint is not None
    assert summary.probe_accuracy is not None and summary.probe_accuracy > 0.5
    restored = CheckpointStore(config.checkpoints.dir, create=False).restore_latest(state_like=learner.init(0))
    assert restored is not None and params_digest(restored.state) == params_digest(loop.final_state)
