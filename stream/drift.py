"""Seeded drift streams that online learning is measured on: SEA, rotating Hyperplane, RBF, Agrawal.

These are the classic synthetic streams of the online-learning literature, generated as
MOA (Bifet et al. 2010) and River (Montiel et al. 2021) generate them and following the
papers that define them. Every stream is a pure function of (generator options,
examples, seed): the same arguments give the same examples, in the same order, bit for
bit. Each example knows the concept that labelled it ("concept-1", "concept-2", ...: the
segment name the probe and per-concept accuracy use) and its label before noise.

- **SEA** (Street & Kim 2001, "A streaming ensemble algorithm (SEA) for large-scale
  classification"): f1, f2, f3 uniform in [0, 10); f3 is irrelevant. Class 0 when
  f1 + f2 <= theta, else class 1, with theta = 8, 9, 7, 9.5 for the four concepts in
  order, and 10% of the labels flipped. The class convention is MOA's `SEAGenerator`
  (`attrib1 + attrib2 <= theta ? 0 : 1`) and River's `synth.SEA` (`y = x0 + x1 > theta`).
- **Rotating Hyperplane** (Hulten, Spencer & Domingos 2001, "Mining time-changing data
  streams"; as MOA's `HyperplaneGenerator`): d features uniform in [0, 1) and weights w
  uniform in [0, 1); class 1 when sum_i w_i x_i >= w0 = sum_i w_i / 2. After every example
  each of the first k weights moves by `magnitude` in its direction, and that direction
  reverses with probability `sigma`. 5% label noise.
- **Random RBF with moving centroids** (MOA's `RandomRBFGeneratorDrift`, Bifet et al.
  2009, "New ensemble methods for evolving data streams"): centroids with a centre
  uniform in the unit cube, a class, a standard deviation and a weight, all uniform; an
  example picks a centroid in proportion to its weight and lies at a Gaussian distance
  (the centroid's standard deviation) from its centre in a random direction. Before
  every example each moving centroid advances by `speed` along its own unit direction
  (non-negative components, as MOA draws them), bouncing off the walls of the unit cube.
  No label noise.
- **Agrawal** (Agrawal, Imielinski & Swami 1993, "Database mining: a performance
  perspective", IEEE TKDE 5(6); as MOA's `AgrawalGenerator`): nine attributes of a loan
  applicant and the paper's ten classification functions (numbered 1..10 as in the paper
  and MOA; River numbers them 0..9). Group A of the paper is class 0, group B class 1, as
  in MOA. The attributes are drawn, labelled, then optionally perturbed as MOA does (the
  public C implementation): each number moves by up to +-`perturbation` x its range,
  clamped to its range; the label stays the one of the unperturbed applicant.

Where the references disagree, this module follows the paper and MOA, and says so:
River's `synth.Agrawal` returns 1 for group A in functions 1-6 (0 in 7-10), tests
`salary` where the paper tests `loan` in function 5, and draws commission from
[10K, 85K); MOA clamps a perturbed `hvalue` to [0, 135,000] (a tenth of its top value),
where this module clamps it to its zipcode's range. The moving RBF centroids are
reflected at the walls of the unit cube; MOA clamps them to the wall and reverses them,
which differs by less than one step per bounce.

Concept drift between a sequence of concepts (SEA's thetas, Agrawal's functions) is
`abrupt`, or `gradual` as MOA's and River's `ConceptDriftStream` define it: the example
at position t (counted from 0) comes from the next concept with probability
1 / (1 + exp(-4 (t - p) / width)), p the drift's position. The concepts split the
stream into equal blocks; drift k sits at the first example of block k. The Hyperplane
and RBF streams drift continuously; their "concepts" are equal blocks of the stream.

A stream comes out two ways. `DriftStream.events()`: named-field JSON events as a real
producer writes them, e.g. {"f1": 6.39, "f2": 0.25, "f3": 2.75, "label": 0,
"concept": "concept-1"}; Agrawal's categorical attributes (elevel 0..4, car 1..20,
zipcode 0..8) are integers, as River emits them. `DriftStream.arrays()`: x float32
[N, F] for the array path, where every number is scaled by its documented range to
[0, 1] (`(v - low) / (high - low)`: Agrawal's salaries of 1e5 would swamp a network;
values outside the range, e.g. RBF examples around a centroid near a wall, stay
outside) and every categorical attribute is one-hot. `drift_scenario` makes a
`Scenario` whose segments are the concept blocks, each with a noise-free test split
drawn from its concept as it stands at the block's end, for `ScenarioSource` and
`continuity.benchmarks.guard`.

Randomness: independent NumPy streams keyed by (seed, purpose[, concept]): the inputs,
the label noise, the concept mixing, the perturbation, the generator's model (weights,
centroids) and each held-out split draw from their own, so changing the noise rate
changes no input, and no test split depends on the length of the stream.
"""

from __future__ import annotations

import json
import tracemalloc
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar, NamedTuple

import numpy as np

from continuity.stream.scenarios import Scenario, Segment

DRIFT_SCENARIOS = ("sea", "hyperplane", "rbf-drift", "agrawal")
DRIFTS = ("abrupt", "gradual")
DEFAULT_EXAMPLES = 50_000
DEFAULT_TEST_EXAMPLES = 1_000  # per concept, in drift_scenario

# One random stream per purpose (see the module docstring).
_INPUTS, _NOISE, _MIX, _PERTURB, _MODEL, _HELD_OUT, _HELD_OUT_PERTURB = range(7)


def _rng(seed: int, stream: str, purpose: int, index: int = 0) -> np.random.Generator:
    # The stream's place in DRIFT_SCENARIOS keys it too: SEA's inputs are not Hyperplane's, scaled.
    return np.random.default_rng([seed, DRIFT_SCENARIOS.index(stream), purpose, index])


# ---------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class NumericField:
    """A number: written to events as it is; in arrays scaled by its documented range [low, high] to [0, 1]."""

    name: str
    low: float
    high: float

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.name,)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """float32, shape=(N, 1)."""
        return ((np.asarray(values, np.float64) - self.low) / (self.high - self.low)).astype(np.float32)[:, None]


@dataclass(frozen=True)
class CategoricalField:
    """A category written as an integer code (as River emits Agrawal's); one-hot in arrays."""

    name: str
    values: tuple[int, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(f"{self.name}={v}" for v in self.values)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """float32, shape=(N, len(values)); a code outside `values` is all zeros."""
        return (np.asarray(values)[:, None] == np.asarray(self.values)[None, :]).astype(np.float32)


Field = NumericField | CategoricalField
Columns = Mapping[str, np.ndarray]  # field name -> shape=(N,): float64 numbers, int64 whole numbers and codes


class DriftArrays(NamedTuple):
    """A drift stream numerically encoded for the array path (see the module docstring)."""

    x: np.ndarray  # float32, shape=(N, F)
    y: np.ndarray  # int32, shape=(N,): the labels as emitted (after noise)
    concept: np.ndarray  # int32, shape=(N,): index into DriftStream.concepts of the concept that labelled each example


class HeldOut(NamedTuple):
    """Noise-free examples of one concept: inputs as the stream draws them, labels before noise."""

    columns: Columns
    truth: np.ndarray  # int32, shape=(M,)


# ---------------------------------------------------------------------------- the stream


# eq=False: the fields are arrays, for which a generated __eq__ would raise.
@dataclass(frozen=True, eq=False)
class DriftStream:
    """One generated drift stream: its examples as named columns, labels, truth and concepts, in order.

    The arrays are read-only: a stream is shared data.
    """

    generator: DriftGenerator
    seed: int
    columns: Columns
    label: np.ndarray  # int32, shape=(N,): after label noise
    truth: np.ndarray  # int32, shape=(N,): before label noise (Agrawal: of the unperturbed applicant)
    concept: np.ndarray  # int32, shape=(N,): the concept that labelled each example (index into `concepts`)
    blocks: tuple[tuple[int, int], ...]  # [start, stop) of each concept's block of positions, in order
    state: Mapping[str, np.ndarray] = field(default_factory=dict)  # the generator's hidden state per example

    @property
    def name(self) -> str:
        return self.generator.name

    @property
    def concepts(self) -> tuple[str, ...]:
        return tuple(f"concept-{k + 1}" for k in range(len(self.blocks)))

    @property
    def num_classes(self) -> int:
        return self.generator.num_classes

    @property
    def fields(self) -> tuple[Field, ...]:
        return self.generator.fields

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The name of each column of `arrays().x`."""
        return tuple(name for f in self.fields for name in f.columns)

    def __len__(self) -> int:
        return len(self.label)

    def encode(self, columns: Columns) -> np.ndarray:
        """Named columns as the array path's x (float32, shape=(N, F))."""
        return np.ascontiguousarray(np.concatenate([f.encode(columns[f.name]) for f in self.fields], axis=1))

    def arrays(self) -> DriftArrays:
        return DriftArrays(self.encode(self.columns), self.label.copy(), self.concept.copy())

    def events(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """Examples [start, stop) as named-field events: the fields in order, then "label" and "concept"."""
        stop = len(self) if stop is None else min(stop, len(self))
        names = [f.name for f in self.fields]
        values = [self.columns[name][start:stop].tolist() for name in names]  # Python floats and ints
        labels = self.label[start:stop].tolist()
        concepts = self.concepts
        kinds = self.concept[start:stop].tolist()
        for i in range(stop - start):
            event: dict = {name: column[i] for name, column in zip(names, values)}
            event["label"] = labels[i]
            event["concept"] = concepts[kinds[i]]
            yield event

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of each event as a Kafka record: key "<name>/<position>", value compact UTF-8 JSON."""
        for i, event in enumerate(self.events(start, stop), start=start):
            yield f"{self.name}/{i}".encode(), json.dumps(event, separators=(",", ":")).encode()

    def held_out(self, concept: int, examples: int) -> HeldOut:
        """`examples` noise-free examples of concept `concept` as it stands at the end of its block."""
        if not 0 <= concept < len(self.blocks):
            raise ValueError(f"concept must be an index in [0, {len(self.blocks) - 1}]. Got {concept!r}.")
        _check_count("examples", examples, 1)
        return self.generator.held_out(self, concept, examples)


# ---------------------------------------------------------------------------- generators


class DriftGenerator(ABC):
    """A drift stream's definition: options as frozen dataclass fields, streams drawn from a seed."""

    name: ClassVar[str]

    @property
    def num_classes(self) -> int:
        return 2

    @property
    @abstractmethod
    def fields(self) -> tuple[Field, ...]: ...

    @property
    @abstractmethod
    def concept_count(self) -> int: ...

    def stream(self, examples: int = DEFAULT_EXAMPLES, *, seed: int = 0) -> DriftStream:
        """The stream of `examples` examples for `seed`: the same arguments give the same stream, bit for bit."""
        _check_count("examples", examples, self.concept_count)
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer. Got {seed!r}.")
        count = self.concept_count
        starts = [k * examples // count for k in range(count + 1)]
        blocks = tuple((starts[k], starts[k + 1]) for k in range(count))
        stream = self._draw(int(examples), int(seed), blocks)
        for array in (stream.label, stream.truth, stream.concept, *stream.columns.values(), *stream.state.values()):
            array.flags.writeable = False
        return stream

    def peak_bytes(self, examples: int, *, sample: int = 20_000) -> int:
        """About the most memory `stream(examples)` holds at once, in bytes: the peak of a
        `sample`-example draw (numpy reports its buffers to tracemalloc), scaled. A stream is
        drawn whole, each array at full length, so the scale is linear; a draw far past memory
        can then be refused before it starts instead of killed by the kernel halfway."""
        sample = max(sample, self.concept_count)
        tracing = tracemalloc.is_tracing()
        if not tracing:
            tracemalloc.start()
        try:
            self.stream(self.concept_count)  # what a first draw allocates once (caches) is not per example
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            self.stream(sample)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            if not tracing:
                tracemalloc.stop()
        return (peak - before) * examples // sample

    @abstractmethod
    def _draw(self, examples: int, seed: int, blocks: tuple[tuple[int, int], ...]) -> DriftStream: ...

    @abstractmethod
    def held_out(self, stream: DriftStream, concept: int, examples: int) -> HeldOut:
        """See DriftStream.held_out."""


def _concept_sequence(
    examples: int, blocks: tuple[tuple[int, int], ...], drift: str, width: float, rng: np.random.Generator
) -> np.ndarray:
    """The concept (int32) of every position when drift k sits at the start of block k.

    abrupt: position t belongs to the last concept whose drift is at or before t.
    gradual (MOA's and River's ConceptDriftStream, chained): drift k is passed at t with
    probability 1 / (1 + exp(-4 (t - p_k) / width)), written 0.5 (1 + tanh(2 (t - p_k) / width))
    so no exp overflows; the concept is the number of drifts passed before the first one that
    is not (chained streams: the third concept is reached only through the second).
    """
    positions = np.array([start for start, _ in blocks[1:]], dtype=np.float64)
    t = np.arange(examples, dtype=np.float64)
    if drift == "abrupt":
        return np.searchsorted(positions, t, side="right").astype(np.int32)
    chance = drift_probability(t[:, None], positions[None, :], width)
    passed = rng.random((examples, len(positions))) < chance
    return np.cumprod(passed, axis=1).sum(axis=1).astype(np.int32)


def drift_probability(t: np.ndarray | float, position: np.ndarray | float, width: float) -> np.ndarray:
    """P(the example at position t comes from the concept after a gradual drift at `position`)."""
    return 0.5 * (1.0 + np.tanh(2.0 * (np.asarray(t, np.float64) - position) / width))


def _flip(truth: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Binary labels with each flipped with probability `rate` (MOA's and River's label noise)."""
    return np.where(rng.random(truth.shape) < rate, 1 - truth, truth).astype(np.int32)


@dataclass(frozen=True)
class SEA(DriftGenerator):
    """SEA concepts (Street & Kim 2001): class 0 when f1 + f2 <= theta, else 1; one theta per concept."""

    name: ClassVar[str] = "sea"
    thetas: tuple[float, ...] = (8.0, 9.0, 7.0, 9.5)
    noise: float = 0.1  # share of labels flipped (MOA's default 10%)
    drift: str = "abrupt"
    width: int = 1000  # gradual drift: examples over which the sigmoid rises (MOA's ConceptDriftStream default)

    def __post_init__(self):
        object.__setattr__(self, "thetas", tuple(float(t) for t in _sequence("thetas", self.thetas)))
        if not all(np.isfinite(self.thetas)):
            raise ValueError(f"thetas must be finite numbers. Got {self.thetas!r}.")
        _check_share("noise", self.noise)
        _check_drift(self.drift, self.width)

    @property
    def fields(self) -> tuple[Field, ...]:
        return tuple(NumericField(f"f{i}", 0.0, 10.0) for i in (1, 2, 3))

    @property
    def concept_count(self) -> int:
        return len(self.thetas)

    def _features(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        x = 10.0 * rng.random((n, 3))
        return {f"f{i + 1}": np.ascontiguousarray(x[:, i]) for i in range(3)}

    def _truth(self, columns: Columns, concept: np.ndarray) -> np.ndarray:
        theta = np.asarray(self.thetas)[concept]
        return (columns["f1"] + columns["f2"] > theta).astype(np.int32)

    def _draw(self, examples, seed, blocks):
        columns = self._features(_rng(seed, self.name, _INPUTS), examples)
        concept = _concept_sequence(examples, blocks, self.drift, self.width, _rng(seed, self.name, _MIX))
        truth = self._truth(columns, concept)
        label = _flip(truth, self.noise, _rng(seed, self.name, _NOISE))
        return DriftStream(self, seed, columns, label, truth, concept, blocks)

    def held_out(self, stream, concept, examples):
        columns = self._features(_rng(stream.seed, self.name, _HELD_OUT, concept), examples)
        return HeldOut(columns, self._truth(columns, np.full(examples, concept)))


@dataclass(frozen=True)
class Hyperplane(DriftGenerator):
    """The rotating hyperplane (Hulten et al. 2001) as MOA's HyperplaneGenerator draws it."""

    name: ClassVar[str] = "hyperplane"
    features: int = 10
    drift_features: int = 2  # the first k weights drift (MOA's numDriftAtts)
    magnitude: float = 0.001  # how far a drifting weight moves per example (MOA's magChange)
    sigma: float = 0.1  # probability that a drifting weight's direction reverses after an example
    noise: float = 0.05  # share of labels flipped (MOA's default 5%)
    segments: int = 4  # equal blocks of the stream, named as its concepts

    def __post_init__(self):
        _check_count("features", self.features, 1)
        if not _is_int(self.drift_features) or not 0 <= self.drift_features <= self.features:
            raise ValueError(f"drift_features must be an integer in [0, {self.features}]. Got {self.drift_features!r}.")
        _check_nonnegative("magnitude", self.magnitude)
        _check_share("sigma", self.sigma)
        _check_share("noise", self.noise)
        _check_count("segments", self.segments, 1)

    @property
    def fields(self) -> tuple[Field, ...]:
        return tuple(NumericField(f"f{i + 1}", 0.0, 1.0) for i in range(self.features))

    @property
    def concept_count(self) -> int:
        return self.segments

    def weights(self, examples: int, seed: int) -> np.ndarray:
        """The weights each example is labelled with (float64, shape=(examples, features)).

        Example t sees w(0) + magnitude * sum_{s<t} direction(s): after every example each
        drifting weight moves one step in its direction, then reverses it with probability
        sigma (MOA's addDrift). Counting steps as integers keeps the sum exact.
        """
        rng = _rng(seed, self.name, _MODEL)
        start = rng.random(self.features)
        k = self.drift_features
        reversals = rng.random((examples, k)) < self.sigma
        # The direction used after example s: +1, reversed once per reversal drawn after examples 0..s-1.
        reversed_before: np.ndarray = np.cumsum(reversals, axis=0) - reversals
        direction = np.where(reversed_before % 2 == 0, 1, -1)
        steps = np.cumsum(direction, axis=0) - direction  # sum over s < t
        weights = np.broadcast_to(start, (examples, self.features)).copy()
        weights[:, :k] += self.magnitude * steps
        return weights

    def _features(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        x = rng.random((n, self.features))
        return {f"f{i + 1}": np.ascontiguousarray(x[:, i]) for i in range(self.features)}

    def _truth(self, columns: Columns, weights: np.ndarray) -> np.ndarray:
        x = np.stack([columns[f"f{i + 1}"] for i in range(self.features)], axis=1)
        return ((x * weights).sum(axis=1) >= 0.5 * weights.sum(axis=1)).astype(np.int32)

    def _draw(self, examples, seed, blocks):
        weights = self.weights(examples, seed)
        columns = self._features(_rng(seed, self.name, _INPUTS), examples)
        truth = self._truth(columns, weights)
        label = _flip(truth, self.noise, _rng(seed, self.name, _NOISE))
        concept = _block_of(examples, blocks)
        return DriftStream(self, seed, columns, label, truth, concept, blocks, {"weights": weights})

    def held_out(self, stream, concept, examples):
        columns = self._features(_rng(stream.seed, self.name, _HELD_OUT, concept), examples)
        last = stream.state["weights"][stream.blocks[concept][1] - 1]
        return HeldOut(columns, self._truth(columns, np.broadcast_to(last, (examples, self.features))))


class RBFModel(NamedTuple):
    """The centroids of a random RBF stream (MOA's generateCentroids), drawn from the seed."""

    centres: np.ndarray  # float64, shape=(C, d): where each centroid starts, uniform in [0, 1)
    classes: np.ndarray  # int32, shape=(C,)
    deviations: np.ndarray  # float64, shape=(C,): standard deviation of the distance from the centre
    weights: np.ndarray  # float64, shape=(C,): how often each centroid is chosen, in proportion
    directions: np.ndarray  # float64, shape=(C, d): unit vectors with non-negative components; zero if it stays


@dataclass(frozen=True)
class RandomRBF(DriftGenerator):
    """Random RBF with moving centroids (MOA's RandomRBFGeneratorDrift)."""

    name: ClassVar[str] = "rbf-drift"
    features: int = 10
    classes: int = 2
    centroids: int = 50
    drift_centroids: int = 50  # the first k centroids move (MOA's numDriftCentroids)
    speed: float = 0.0001  # distance a moving centroid travels per example (MOA's speedChange)
    segments: int = 4  # equal blocks of the stream, named as its concepts

    def __post_init__(self):
        _check_count("features", self.features, 1)
        _check_count("classes", self.classes, 2)
        _check_count("centroids", self.centroids, 1)
        if not _is_int(self.drift_centroids) or not 0 <= self.drift_centroids <= self.centroids:
            raise ValueError(
                f"drift_centroids must be an integer in [0, {self.centroids}]. Got {self.drift_centroids!r}."
            )
        _check_nonnegative("speed", self.speed)
        _check_count("segments", self.segments, 1)

    @property
    def num_classes(self) -> int:
        return self.classes

    @property
    def fields(self) -> tuple[Field, ...]:
        return tuple(NumericField(f"f{i + 1}", 0.0, 1.0) for i in range(self.features))

    @property
    def concept_count(self) -> int:
        return self.segments

    def model(self, seed: int) -> RBFModel:
        rng = _rng(seed, self.name, _MODEL)
        c, d = self.centroids, self.features
        centres = rng.random((c, d))
        classes = rng.integers(self.classes, size=c).astype(np.int32)
        deviations = rng.random(c)
        weights = rng.random(c)
        directions = np.zeros((c, d))
        raw = rng.random((self.drift_centroids, d))
        directions[: self.drift_centroids] = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        return RBFModel(centres, classes, deviations, weights, directions)

    def centres_at(self, model: RBFModel, centroid: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Centre of centroid[i] when example t[i] is drawn (float64, shape=(N, d)).

        A centroid moves before each example (MOA), so example t sees it after t + 1 steps; the
        walls of the unit cube reflect it (a triangle wave of period 2 along each axis).
        """
        travelled = (
            model.centres[centroid]
            + self.speed * (np.asarray(t, np.float64)[:, None] + 1.0) * (model.directions[centroid])
        )
        folded = np.mod(travelled, 2.0)
        return np.where(folded > 1.0, 2.0 - folded, folded)

    def _examples(self, model: RBFModel, t: np.ndarray, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
        """(columns, centroid index) of examples drawn at positions t."""
        n = len(t)
        cumulative = np.cumsum(model.weights)
        centroid = np.minimum(
            np.searchsorted(cumulative, rng.random(n) * cumulative[-1], side="right"), self.centroids - 1
        )
        # MOA: a direction from the cube [-1, 1)^d scaled to unit length, times a Gaussian distance.
        direction = 2.0 * rng.random((n, self.features)) - 1.0
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        distance = rng.standard_normal(n) * model.deviations[centroid]
        x = self.centres_at(model, centroid, t) + direction * distance[:, None]
        return {f"f{i + 1}": np.ascontiguousarray(x[:, i]) for i in range(self.features)}, centroid

    def _draw(self, examples, seed, blocks):
        model = self.model(seed)
        t = np.arange(examples)
        columns, centroid = self._examples(model, t, _rng(seed, self.name, _INPUTS))
        truth = model.classes[centroid]
        state = {"centroid": centroid.astype(np.int32), "centre": self.centres_at(model, centroid, t)}
        return DriftStream(self, seed, columns, truth.copy(), truth, _block_of(examples, blocks), blocks, state)

    def held_out(self, stream, concept, examples):
        model = self.model(stream.seed)
        t = np.full(examples, stream.blocks[concept][1] - 1)
        columns, centroid = self._examples(model, t, _rng(stream.seed, self.name, _HELD_OUT, concept))
        return HeldOut(columns, model.classes[centroid])


# Agrawal et al. (1993): the attributes of a loan applicant, with the ranges the paper draws them from.
_AGRAWAL_FIELDS: tuple[Field, ...] = (
    NumericField("salary", 20_000.0, 150_000.0),
    NumericField("commission", 0.0, 75_000.0),  # 0 when salary >= 75K, else uniform in [10K, 75K]
    NumericField("age", 20.0, 80.0),  # a whole number (int64 column, int in events), as hyears
    CategoricalField("elevel", tuple(range(5))),
    CategoricalField("car", tuple(range(1, 21))),
    CategoricalField("zipcode", tuple(range(9))),
    NumericField("hvalue", 50_000.0, 1_350_000.0),  # uniform in [k 50K, k 150K], k = 9 - zipcode
    NumericField("hyears", 1.0, 30.0),
    NumericField("loan", 0.0, 500_000.0),
)


def _within(v: np.ndarray, low: float, high: float) -> np.ndarray:
    return (low <= v) & (v <= high)


def _by_age(a: Columns, young: np.ndarray, middle: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Group A by age band: under 40, 40 to 59, 60 and over."""
    return np.where(a["age"] < 40, young, np.where(a["age"] < 60, middle, old))


def _disposable_is_positive(
    a: Columns, *, per_elevel: float, loan_share: float, equity_share: float, base: float
) -> np.ndarray:
    """The paper's disposable income is positive: 2/3 (salary + commission) - per_elevel * elevel
    - loan_share * loan + equity_share * equity - base, with equity = hvalue (hyears - 20) / 10 once
    a house is held 20 years (as MOA and River compute it)."""
    equity = np.where(a["hyears"] >= 20, a["hvalue"] * (a["hyears"] - 20.0) / 10.0, 0.0)
    total = 2.0 * (a["salary"] + a["commission"]) / 3.0
    return total - per_elevel * a["elevel"] - loan_share * a["loan"] + equity_share * equity - base > 0


def _f1(a: Columns) -> np.ndarray:
    return (a["age"] < 40) | (a["age"] >= 60)


def _f2(a: Columns) -> np.ndarray:
    s = a["salary"]
    return _by_age(a, _within(s, 50e3, 100e3), _within(s, 75e3, 125e3), _within(s, 25e3, 75e3))


def _f3(a: Columns) -> np.ndarray:
    e = a["elevel"]
    return _by_age(a, e <= 1, (1 <= e) & (e <= 3), e >= 2)


def _f4(a: Columns) -> np.ndarray:
    s, e = a["salary"], a["elevel"]
    return _by_age(
        a,
        np.where(e <= 1, _within(s, 25e3, 75e3), _within(s, 50e3, 100e3)),
        np.where((1 <= e) & (e <= 3), _within(s, 50e3, 100e3), _within(s, 75e3, 125e3)),
        np.where(e >= 2, _within(s, 50e3, 100e3), _within(s, 25e3, 75e3)),
    )


def _f5(a: Columns) -> np.ndarray:
    s, loan = a["salary"], a["loan"]
    return _by_age(
        a,
        np.where(_within(s, 50e3, 100e3), _within(loan, 100e3, 300e3), _within(loan, 200e3, 400e3)),
        np.where(_within(s, 75e3, 125e3), _within(loan, 200e3, 400e3), _within(loan, 300e3, 500e3)),
        np.where(_within(s, 25e3, 75e3), _within(loan, 300e3, 500e3), _within(loan, 100e3, 300e3)),
    )


def _f6(a: Columns) -> np.ndarray:
    total = a["salary"] + a["commission"]
    return _by_age(a, _within(total, 50e3, 100e3), _within(total, 75e3, 125e3), _within(total, 25e3, 75e3))


def _f7(a: Columns) -> np.ndarray:
    return _disposable_is_positive(a, per_elevel=0.0, loan_share=0.2, equity_share=0.0, base=20e3)


def _f8(a: Columns) -> np.ndarray:
    return _disposable_is_positive(a, per_elevel=5000.0, loan_share=0.0, equity_share=0.0, base=20e3)


def _f9(a: Columns) -> np.ndarray:
    return _disposable_is_positive(a, per_elevel=5000.0, loan_share=0.2, equity_share=0.0, base=10e3)


def _f10(a: Columns) -> np.ndarray:
    return _disposable_is_positive(a, per_elevel=5000.0, loan_share=0.0, equity_share=0.2, base=10e3)


_AGRAWAL_GROUP_A: tuple[Callable[[Columns], np.ndarray], ...] = (_f1, _f2, _f3, _f4, _f5, _f6, _f7, _f8, _f9, _f10)


def agrawal_label(function: int, applicants: Columns) -> np.ndarray:
    """Class (int32) of each applicant under the paper's classification function 1..10: 0 in group A, 1 in B."""
    if not _is_int(function) or not 1 <= function <= 10:
        raise ValueError(f"an Agrawal function is an integer in [1, 10]. Got {function!r}.")
    columns = {name: np.asarray(values) for name, values in applicants.items()}
    return np.where(_AGRAWAL_GROUP_A[function - 1](columns), 0, 1).astype(np.int32)


@dataclass(frozen=True)
class Agrawal(DriftGenerator):
    """Agrawal et al. (1993)'s loan applicants, labelled by a sequence of its classification functions."""

    name: ClassVar[str] = "agrawal"
    functions: tuple[int, ...] = (1, 2, 3, 4)  # one concept per function, in order (the paper's numbers)
    perturbation: float = 0.05  # MOA's default peturbFraction; 0 emits the applicants as labelled
    drift: str = "abrupt"
    width: int = 1000  # gradual drift: examples over which the sigmoid rises (MOA's ConceptDriftStream default)

    def __post_init__(self):
        functions = tuple(_sequence("functions", self.functions))
        if not all(_is_int(f) and 1 <= f <= 10 for f in functions):
            raise ValueError(f"functions must be integers in [1, 10] (the paper's numbers). Got {functions!r}.")
        object.__setattr__(self, "functions", tuple(int(f) for f in functions))
        _check_share("perturbation", self.perturbation)
        _check_drift(self.drift, self.width)

    @property
    def fields(self) -> tuple[Field, ...]:
        return _AGRAWAL_FIELDS

    @property
    def concept_count(self) -> int:
        return len(self.functions)

    @staticmethod
    def applicants(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """n applicants drawn as the paper and MOA draw them (car counted 1..20, as the paper and River count it)."""
        salary = 20_000.0 + 130_000.0 * rng.random(n)
        commission = np.where(salary >= 75_000.0, 0.0, 10_000.0 + 65_000.0 * rng.random(n))
        age = 20 + rng.integers(61, size=n)
        elevel = rng.integers(5, size=n)
        car = 1 + rng.integers(20, size=n)
        zipcode = rng.integers(9, size=n)
        hvalue = (9.0 - zipcode) * 100_000.0 * (0.5 + rng.random(n))
        hyears = 1 + rng.integers(30, size=n)
        loan = 500_000.0 * rng.random(n)
        return {
            "salary": salary,
            "commission": commission,
            "age": age.astype(np.int64),
            "elevel": elevel.astype(np.int64),
            "car": car.astype(np.int64),
            "zipcode": zipcode.astype(np.int64),
            "hvalue": hvalue,
            "hyears": hyears.astype(np.int64),
            "loan": loan,
        }

    def perturb(self, applicants: Columns, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """MOA's perturbValue: v + range * U(-1, 1) * perturbation, clamped to the range; whole numbers rounded.

        The categorical attributes and a zero commission are left alone; hvalue's range is its
        zipcode's, (9 - zipcode) * [50K, 150K].
        """
        if self.perturbation == 0:
            return dict(applicants)
        n = len(applicants["salary"])
        p = self.perturbation

        def moved(values: np.ndarray, low: np.ndarray | float, high: np.ndarray | float) -> np.ndarray:
            span = np.asarray(high) - np.asarray(low)
            return np.clip(values + span * (2.0 * (rng.random(n) - 0.5)) * p, low, high)

        def rounded(values: np.ndarray) -> np.ndarray:
            return np.floor(values + 0.5).astype(np.int64)  # Java's Math.round, as MOA rounds

        k = 9.0 - applicants["zipcode"]
        out = dict(applicants)
        out["salary"] = moved(applicants["salary"], 20_000.0, 150_000.0)
        commission = moved(applicants["commission"], 10_000.0, 75_000.0)
        out["commission"] = np.where(applicants["commission"] > 0, commission, 0.0)
        out["age"] = rounded(moved(applicants["age"].astype(np.float64), 20.0, 80.0))
        out["hvalue"] = moved(applicants["hvalue"], k * 50_000.0, k * 150_000.0)
        out["hyears"] = rounded(moved(applicants["hyears"].astype(np.float64), 1.0, 30.0))
        out["loan"] = moved(applicants["loan"], 0.0, 500_000.0)
        return out

    def _truth(self, applicants: Columns, concept: np.ndarray) -> np.ndarray:
        truth = np.empty(len(concept), np.int32)
        for k, function in enumerate(self.functions):
            rows = concept == k
            if rows.any():
                truth[rows] = agrawal_label(function, {name: v[rows] for name, v in applicants.items()})
        return truth

    def _draw(self, examples, seed, blocks):
        applicants = self.applicants(_rng(seed, self.name, _INPUTS), examples)
        concept = _concept_sequence(examples, blocks, self.drift, self.width, _rng(seed, self.name, _MIX))
        truth = self._truth(applicants, concept)
        columns = self.perturb(applicants, _rng(seed, self.name, _PERTURB))
        state = {"function": np.asarray(self.functions, np.int32)[concept]}
        return DriftStream(self, seed, columns, truth.copy(), truth, concept, blocks, state)

    def held_out(self, stream, concept, examples):
        applicants = self.applicants(_rng(stream.seed, self.name, _HELD_OUT, concept), examples)
        truth = agrawal_label(self.functions[concept], applicants)
        return HeldOut(self.perturb(applicants, _rng(stream.seed, self.name, _HELD_OUT_PERTURB, concept)), truth)


_GENERATORS: dict[str, type[DriftGenerator]] = {g.name: g for g in (SEA, Hyperplane, RandomRBF, Agrawal)}


def options(name: str) -> tuple[str, ...]:
    """The options the drift stream `name` takes (its generator's fields)."""
    return tuple(f.name for f in fields(_generator_class(name)))  # type: ignore[arg-type]


def make_generator(name: str, **settings) -> DriftGenerator:
    """The generator of drift stream `name` (one of DRIFT_SCENARIOS) with `settings` over its defaults.

    Raises ValueError naming an option the stream does not take, or a value out of range.
    """
    known = options(name)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"{name!r} takes no option {unknown[0]!r}; its options are {', '.join(known)}.")
    return _generator_class(name)(**settings)


def make_drift_stream(name: str, *, examples: int = DEFAULT_EXAMPLES, seed: int = 0, **settings) -> DriftStream:
    """The drift stream `name` with `examples` examples for `seed` (see make_generator for `settings`)."""
    return make_generator(name, **settings).stream(examples, seed=seed)


def drift_scenario(stream: DriftStream, *, test_examples: int = DEFAULT_TEST_EXAMPLES) -> Scenario:
    """A Scenario whose segments are the stream's concept blocks, in order, for ScenarioSource and the guard.

    Segment k trains on block k exactly as the stream emits it (labels after noise; under
    gradual drift a block's first examples may still come from concept k - 1, whose
    per-example concept only `DriftStream.concept` and the events carry), and tests on
    `test_examples` noise-free examples of concept k as it stands at the block's end.
    """
    _check_count("test_examples", test_examples, 1)
    x, y, _ = stream.arrays()
    segments = []
    for k, (start, stop) in enumerate(stream.blocks):
        held = stream.held_out(k, test_examples)
        segments.append(
            Segment(
                name=stream.concepts[k],
                train_x=_read_only(x[start:stop].copy()),
                train_y=_read_only(y[start:stop].copy()),
                test_x=_read_only(stream.encode(held.columns)),
                test_y=_read_only(np.asarray(held.truth, np.int32).copy()),
            )
        )
    return Scenario(
        name=stream.name,
        segments=tuple(segments),
        num_classes=stream.num_classes,
        example_shape=(x.shape[1],),
        seed=stream.seed,
    )


# ---------------------------------------------------------------------------- checks


def _generator_class(name: str) -> type[DriftGenerator]:
    try:
        return _GENERATORS[name]
    except KeyError:
        raise ValueError(
            f"drift stream must be one of {', '.join(repr(n) for n in DRIFT_SCENARIOS)}. Got {name!r}."
        ) from None


def _block_of(examples: int, blocks: tuple[tuple[int, int], ...]) -> np.ndarray:
    starts = np.array([start for start, _ in blocks[1:]], dtype=np.int64)
    return np.searchsorted(starts, np.arange(examples), side="right").astype(np.int32)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_count(option: str, value, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}. Got {value!r}.")


def _check_share(option: str, value) -> None:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{option} must be a number in [0, 1]. Got {value!r}.")


def _check_nonnegative(option: str, value) -> None:
    if not _is_number(value) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{option} must be a finite number >= 0. Got {value!r}.")


def _check_drift(drift, width) -> None:
    if drift not in DRIFTS:
        raise ValueError(f"drift must be one of {', '.join(repr(d) for d in DRIFTS)}. Got {drift!r}.")
    _check_count("width", width, 1)


def _sequence(option: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{option} must be a non-empty sequence. Got {value!r}.")
    items = tuple(value)
    if not items or not all(_is_number(v) for v in items):
        raise ValueError(f"{option} must be a non-empty sequence of numbers. Got {value!r}.")
    return items
