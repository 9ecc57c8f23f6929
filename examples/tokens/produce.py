"""A seeded stream of token sequences whose vocabulary drifts, produced as JSON records.

Four classes (topics). Each example is up to `length` token ids (zero-padded) and two
numbers; most of its tokens are drawn from its class's own words, the rest from a shared
pool. Every segment, each class swaps a quarter of its words for new ones (ids never
seen before), so the model meets new vocabulary as the stream goes on while old words
keep their meaning: the drift a continual learner should follow without forgetting.
Same seed, same records, bit for bit.

    python -m examples.tokens.produce --bootstrap 127.0.0.1:9092 --topic tokens --examples 4000
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np

from continuity.stream.codecs import encode_json

CLASSES = 4
WORDS = 24  # per class and segment
SHARED = 64  # ids 1..64: words every class uses
LENGTH = 16


def generate(
    *, examples: int, segments: int = 4, seed: int = 0, length: int = LENGTH
) -> Iterator[tuple[dict, int, str]]:
    """(features, label, segment name) per example: features {"tokens": int32[length], "numeric": float32[2]}."""
    rng = np.random.default_rng(seed)
    next_id = SHARED + 1
    words = []
    for _ in range(CLASSES):
        words.append(np.arange(next_id, next_id + WORDS))
        next_id += WORDS
    per_segment = -(-examples // segments)
    for index in range(examples):
        segment = index // per_segment
        if index % per_segment == 0 and segment > 0:  # the vocabulary drifts: a quarter of each class's words are new
            for c in range(CLASSES):
                replaced = rng.choice(WORDS, WORDS // 4, replace=False)
                words[c] = words[c].copy()
                words[c][replaced] = np.arange(next_id, next_id + len(replaced))
                next_id += len(replaced)
        label = int(rng.integers(CLASSES))
        n = int(rng.integers(length // 2, length + 1))
        own = rng.random(n) < 0.6
        tokens = np.where(own, rng.choice(words[label], n), rng.integers(1, SHARED + 1, n))
        padded = np.zeros(length, np.int32)
        padded[:n] = tokens
        numeric = np.array([n / length, rng.normal()], np.float32)
        yield {"tokens": padded, "numeric": numeric}, label, f"vocabulary-{segment}"


def records(**kwargs) -> Iterator[tuple[bytes, bytes]]:
    """(key, JSON value) per example, as `continuity serve` with examples/tokens/config.toml reads them."""
    for i, (x, y, segment) in enumerate(generate(**kwargs)):
        yield f"tokens-{i}".encode(), encode_json(x, np.int32(y), segment=segment)


def main(argv=None) -> int:
    from continuity.stream.kafka import create_topic, produce_records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="tokens")
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    create_topic(args.bootstrap, args.topic)
    sent = produce_records(
        args.bootstrap, args.topic, records(examples=args.examples, segments=args.segments, seed=args.seed)
    )
    print(f"produced {sent:,} records to {args.topic}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
