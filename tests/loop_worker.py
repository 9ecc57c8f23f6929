"""A training-loop process over a recorded stream, for the kill-and-restart test (not a test itself).

Usage: python tests/loop_worker.py RECORDING CHECKPOINT_DIR [STEPS_PER_DISPATCH]
Prints the final params digest and the since-start prequential figures (`outcome_line`).
`build_loop` is shared with the in-process reference run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from continuity.checkpoints import CheckpointStore
from continuity.factory import learner_for
from continuity.guard import GuardConfig
from continuity.learner import EWCConfig, LearnerConfig, ModelConfig, ReplayConfig
from continuity.loop import StreamInput, TrainingLoop, params_digest
from continuity.probe import ProbeConfig
from continuity.stream import FeatureSpec, FileSource, JsonLinesDeadLetters, make_codec

SPEC = FeatureSpec((8, 8, 1), "float32", 10)


def build_loop(
    recording: Path,
    directory: Path,
    *,
    guard: GuardConfig = GuardConfig(every_examples=400),
    live: bool = False,
    source=FileSource,
    keep_last: int = 2,
    steps_per_dispatch: int = 1,
    hidden: tuple[int, ...] = (64,),
    **options,
) -> TrainingLoop:
    """The loop of these tests over `recording`; `options` go to TrainingLoop (e.g. max_unsaved_s)."""
    codec = make_codec("binary", SPEC)
    stream = StreamInput(
        open_source=lambda positions: source(recording, start=positions),
        codec=codec,
        dead_letters=JsonLinesDeadLetters(directory / "dead-letters.jsonl"),
        quarantine=JsonLinesDeadLetters(directory / "quarantine.jsonl"),
        live=live,
    )
    learner = learner_for(
        LearnerConfig(
            model=ModelConfig(hidden=hidden),
            replay=ReplayConfig(capacity=256, batch_size=16),
            ewc=EWCConfig(enabled=True, strength=100.0, fisher_samples=64),
            steps_per_dispatch=steps_per_dispatch,
        ),
        SPEC.shape,
        SPEC.num_classes,
    )
    store = CheckpointStore(directory / "checkpoints", keep_last=keep_last)
    return TrainingLoop(stream, learner, store, probe=ProbeConfig(holdout_fraction=0.1), guard=guard, seed=0, **options)


def outcome_line(loop: TrainingLoop) -> str:
    """The final params digest, prequential accuracy and examples counted: equal for equal runs."""
    summary = loop.summary
    return f"{params_digest(loop.final_state)} {summary.prequential_accuracy!r} {summary.prequential_examples}"


if __name__ == "__main__":
    loop = build_loop(Path(sys.argv[1]), Path(sys.argv[2]), steps_per_dispatch=int(sys.argv[3]) if sys.argv[3:] else 1)
    loop.run()
    loop.store.close()
    print(outcome_line(loop), flush=True)
