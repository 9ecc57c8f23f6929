"""Window checks: damage that shows in the examples a window trained on, whatever the probe says.

The probe alone cannot tell drift from damage: a new digits permutation makes old
segments forget as much as some broken labelers do (BENCHMARKS.md, "Guard"). Most damage shows in the
window's own examples instead, as TFX's data validation looks at a batch before training
on it. Each check is a per-row indicator over a bounded uniform sample of the window's
trained rows (`WindowSample`), kept in arrival order:

- `contradicted`: the last good model was confident (its probability for its own
  prediction >= `confidence`), the label is a class it has been taught (seen in an
  accepted window), and the label says otherwise. Labels corrupted on inputs the model
  knows contradict it; inputs it has not seen (a new permutation) mostly do not, a new
  class cannot, and a real concept change overturns only part of what it knew.
- `unlearned`: the candidate, trained on the window, still gets the row's label (a class
  it has been taught) wrong. Shuffled labels cannot be learned (within-window accuracy
  stays near chance); a real concept change, or a new permutation, is learned within
  its window. A new class is not counted: replay learners such as ER-ACE learn one
  only once it is replayed (BENCHMARKS.md, split-digits). Each block is judged on it only
  by its rows followed by at least half a window (`probe.every_examples` / 2, at least 500) of training
  (about a full window's first half; none of a window closed early, on time, on a live
  stream): a new distribution arriving late in a window is not learned yet, whatever its
  labels.
- `outlier`: the row's scale (root mean square of its features) lies outside
  [low / 2, 2 high], where [low, high] spans the central 99% of rows in accepted windows:
  a unit bug (x 255), zeroed features. The factor 2 lets ordinary covariate drift
  (a rotation blurring the digits) through.
- `repeated`: the row's features equal those of the row sampled just before it:
  features frozen or zeroed, one record sent again and again.
- `same_label`: the row's label equals that of the row sampled just before it (a label
  collision): a constant label, one class only.

All five are global, not per feature, so permuting the features or rotating the images
barely moves them.

The test, per indicator and block of the sample: with r the indicator's reference rate
(the median over the last accepted windows; for `outlier` the 1% its range leaves out)
and `tolerance` the rise drift may bring, the null hypothesis is "this block's rate is at
most r + tolerance". An exact one-sided binomial test of the k rows set among the n
sampled, p = P(X >= k) with X ~ Binomial(n, r + tolerance), rejects it when p < level.
The blocks are the whole sample and its halves, quarters and eighths in arrival order (15),
so a burst filling part of a window is judged on its own rows. The level is `alpha`
Bonferroni-corrected over the 5 indicators x 15 blocks: a window whose rates stay within
`tolerance` of accepted history is called damaged with probability at most `alpha`,
whatever the stream. Nothing is tested before `MIN_HISTORY` windows have been accepted
(the first windows are a model learning from scratch: no reference), nor on a block of
fewer than `min_rows` rows.

The design assumptions, stated: a window in which more than `tolerance` of the rows
(above what accepted windows showed) overturn a confident prediction of a class the model
was taught, or stay unlearned after training on them, is damage, not a concept change;
so is a window whose rows' scale leaves the accepted range by more than a factor 2, or
whose rows repeat, or whose labels collide, that much more often than accepted windows'.
A change that persists is the operator's to accept (`probe.on_sustained_regression`).

Threading: NOT thread-safe; the service loop owns these objects.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import bdtrc

INDICATORS = ("contradicted", "unlearned", "outlier", "repeated", "same_label")
OUTLIER_TAILS = 0.01  # share of accepted rows outside [low, high], by construction
SCALE_MARGIN = 2.0  # a row is out of scale below low / 2 or above 2 x high
# Accepted windows needed before anything is tested: the first windows of a stream are a model
# learning from scratch, and a median of one or two of them is no reference (measured: Agrawal's
# second window left 0.2 above its first unlearned).
MIN_HISTORY = 3
_LEVELS = 4  # the whole sample, its halves, quarters and eighths
BLOCKS = 2**_LEVELS - 1


class WindowSample:
    """A uniform sample of up to `capacity` of a window's trained rows, kept with their arrival numbers.

    Reservoir sampling with Li's skips (Li 1994, "Reservoir-sampling algorithms of time
    complexity O(n(1 + log(N/n)))", algorithm L): once the sample is full, a batch that
    holds no chosen row costs one comparison, so sampling every batch of a 50,000-example
    window costs next to nothing beside training it. Seeded per window, so the same
    records give the same sample.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"`probe.window_sample` must be >= 1. Got {capacity!r}.")
        self.capacity = capacity
        self.start(())

    def start(self, seed: Sequence[int]) -> None:
        """Empty the sample for a new window whose draws are seeded by `seed` (non-negative integers)."""
        self._rng = np.random.default_rng([0x57A3, *seed])
        self._uniforms: list[float] = []
        self.seen = 0  # rows offered in this window
        # Set when the window ended where a retrain's excised span did, short of a window by design:
        # its rows are judged on `unlearned` against its own length, not a full window's.
        self.cut_short = False
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None
        self._arrival = np.zeros(self.capacity, np.int64)
        self._w = math.exp(math.log(self._uniform()) / self.capacity)
        self._next = self.capacity + self._skip()  # the next arrival to enter the full sample

    def _uniform(self) -> float:
        """A uniform draw in (0, 1), taken from a batch of them (one NumPy call per 1,024 draws)."""
        if not self._uniforms:
            self._uniforms = self._rng.random(1024).tolist()
        return self._uniforms.pop() or 1e-300  # never log(0)

    def _skip(self) -> int:
        return math.floor(math.log(self._uniform()) / math.log1p(-self._w))

    def add(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray, count: int | None = None) -> None:
        """Offer the rows of (x, y) that `rows` (a boolean mask over the batch) selects: those trained on.

        `count`: how many rows `rows` selects, when the caller knows it already.
        """
        count = int(np.count_nonzero(rows)) if count is None else count
        if not count:
            return
        end = self.seen + count
        if self.seen >= self.capacity and self._next >= end:  # the common case: nothing chosen here
            self.seen = end
            return
        index = np.flatnonzero(rows)
        if self._x is None or self._y is None:
            self._x = np.zeros((self.capacity, *x.shape[1:]), np.float32)
            self._y = np.zeros(self.capacity, y.dtype)
        filling = max(0, min(self.capacity - self.seen, count))
        if filling:
            slots = np.arange(self.seen, self.seen + filling)
            self._x[slots], self._y[slots], self._arrival[slots] = x[index[:filling]], y[index[:filling]], slots
        while self._next < end:
            slot = min(int(self._uniform() * self.capacity), self.capacity - 1)
            row = index[self._next - self.seen]
            self._x[slot], self._y[slot], self._arrival[slot] = x[row], y[row], self._next
            self._w *= math.exp(math.log(self._uniform()) / self.capacity)
            self._next += self._skip() + 1
        self.seen = end

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The sampled (x, y), in arrival order."""
        filled = min(self.seen, self.capacity)
        if self._x is None or self._y is None or not filled:
            return np.zeros((0,), np.float32), np.zeros(0, np.int32)
        order = np.argsort(self._arrival[:filled], kind="stable")
        return self._x[:filled][order], self._y[:filled][order]

    def arrivals(self) -> np.ndarray:
        """The arrival number (the window's trained-row index) of each sampled row, in arrival order."""
        return np.sort(self._arrival[: min(self.seen, self.capacity)])

    def span_of(self, rows: np.ndarray) -> tuple[int, int] | None:
        """The window's trained rows [first, end) from the first flagged sampled row to the last one
        (`rows`: one flag per sampled row, in arrival order), reaching to the unflagged sampled rows
        beside them; None when none is flagged."""
        arrival = self.arrivals()
        flagged = np.flatnonzero(rows)
        if not len(flagged) or len(rows) != len(arrival):
            return None
        lo, hi = int(flagged[0]), int(flagged[-1]) + 1
        return (int(arrival[lo - 1]) + 1 if lo > 0 else 0), (int(arrival[hi]) if hi < len(arrival) else self.seen)

    def damaged_rows(self, verdict: WindowVerdict) -> tuple[int, int] | None:
        """The window's trained rows [first, end) that the blocks which fired cover (the whole
        window, [0, seen), when they cover all of it); None when no block fired (a whole-window
        test alone, or none), so nothing locates the damage. Of a block that fired, only its
        halves that fired count when one did: a diluted coarse block does not widen the span.

        A block's rows reach from just after the previous block's last sampled row to just
        before the next block's first, so the rows between samples are counted in, not out.
        """
        blocks = {(f.check, f.block) for f in verdict.fired}

        def explained(check: str, block: str) -> bool:
            """A block one of whose halves fired too: the finer block says where the damage is."""
            part, parts = (int(v) for v in block.split("/"))
            return any((check, f"{2 * part - k}/{2 * parts}") in blocks for k in (1, 0))

        fired = [f for f in verdict.fired if f.block != "1/1" and not explained(f.check, f.block)]
        if any(f.check != "unlearned" for f in fired):  # tested in every block, they place the damage better
            fired = [f for f in fired if f.check != "unlearned"]
        arrival = self.arrivals()
        if not fired or not len(arrival):
            return None
        first, end = self.seen, 0
        for finding in fired:
            part, parts = (int(v) for v in finding.block.split("/"))
            index = np.array_split(np.arange(len(arrival)), parts)[part - 1]
            if not len(index):
                continue
            lo, hi = int(index[0]), int(index[-1]) + 1
            first = min(first, int(arrival[lo - 1]) + 1 if lo > 0 else 0)
            if finding.check == "unlearned" and hi + (hi - lo) > verdict.learnable:
                end = self.seen  # the damage may go on where `unlearned` is not tested: assume it does
            else:
                end = max(end, int(arrival[hi]) if hi < len(arrival) else self.seen)
        if first >= end:
            return None
        return first, min(end, self.seen)


@dataclass(frozen=True)
class WindowFigures:
    """What a window's sample looked like; an accepted window's are the reference later ones are tested against."""

    rows: int
    rates: dict  # indicator -> share of the sampled rows where it was set (and "known": share predicted confidently)
    scale_low: float  # 0.5% quantile of the rows' root mean square
    scale_high: float  # 99.5% quantile
    classes: tuple = ()  # labels present in the sample
    trained: int = 0  # rows the window trained on (the sample is drawn from them)

    def to_json(self) -> dict:
        return {
            "rows": self.rows,
            "trained": self.trained,
            "rates": {k: round(v, 6) for k, v in self.rates.items()},
            "scale_low": self.scale_low,
            "scale_high": self.scale_high,
            "classes": list(self.classes),
        }

    @classmethod
    def from_json(cls, data: dict) -> WindowFigures:
        return cls(
            int(data["rows"]),
            dict(data["rates"]),
            float(data["scale_low"]),
            float(data["scale_high"]),
            tuple(data.get("classes", ())),
            int(data.get("trained", 0)),
        )


class WindowHistory:
    """The figures of the last `windows` accepted windows, and every class they taught (saved with checkpoints)."""

    def __init__(self, windows: int = 32):
        self.windows: deque[WindowFigures] = deque(maxlen=windows)
        self.classes: set[int] = set()

    def __len__(self) -> int:
        return len(self.windows)

    def add(self, figures: WindowFigures) -> None:
        self.windows.append(figures)
        self.classes.update(int(c) for c in figures.classes)

    def reference(self, indicator: str) -> float:
        """The indicator's typical rate in accepted windows: the median, so one concept change moves it little."""
        if indicator == "outlier":
            return OUTLIER_TAILS
        return statistics.median(w.rates[indicator] for w in self.windows)

    def scale_range(self) -> tuple[float, float]:
        """The scales a row may take: accepted windows' central 99%, widened over all of them and by SCALE_MARGIN."""
        low = min(w.scale_low for w in self.windows)
        high = max(w.scale_high for w in self.windows)
        return low / SCALE_MARGIN, high * SCALE_MARGIN

    def to_json(self) -> dict:
        return {"windows": [w.to_json() for w in self.windows], "classes": sorted(self.classes)}

    def restore(self, data: dict) -> None:
        self.windows.clear()
        for item in data.get("windows", ()):
            self.windows.append(WindowFigures.from_json(item))
        self.classes = {int(c) for c in data.get("classes", ())}


@dataclass(frozen=True)
class Finding:
    """One binomial test of one indicator on one block of the sample."""

    check: str  # an indicator of INDICATORS
    block: str  # "1/1": the whole sample; "2/4": its second quarter in arrival order
    rows: int
    count: int  # rows where the indicator is set
    reference: float  # the indicator's rate in accepted windows
    null_rate: float  # reference + tolerance: the largest rate the null hypothesis allows
    p_value: float
    level: float  # alpha over the tests of the family

    @property
    def rate(self) -> float:
        return self.count / self.rows if self.rows else 0.0

    @property
    def fired(self) -> bool:
        return self.p_value < self.level

    def to_json(self) -> dict:
        return {
            "check": f"window.{self.check}",
            "block": self.block,
            "test": "binomial",
            "rows": self.rows,
            "count": self.count,
            "rate": round(self.rate, 6),
            "reference": round(self.reference, 6),
            "null_rate": round(self.null_rate, 6),
            "p_value": self.p_value,
            "level": self.level,
        }


@dataclass(frozen=True)
class WindowVerdict:
    """The window checks' decision: every indicator's whole-window test, and any block test that fired."""

    damaged: bool
    figures: WindowFigures
    findings: list[Finding] = field(default_factory=list)
    checked: bool = True  # False: no accepted window to compare with yet (figures only)
    learnable: int = 0  # the first sampled rows, those judged on `unlearned` (enough training after them)
    # Which sampled rows (arrival order) look like the probe segments that regressed: where a probe
    # regression came from, when no block test says (see `resembling_rows`). None: nothing regressed.
    resembling: np.ndarray | None = None

    name = "window"  # its key in the verdict's JSON

    @property
    def regressed(self) -> bool:
        return self.damaged

    @property
    def fired(self) -> list[Finding]:
        return [f for f in self.findings if f.fired]

    def scopes(self) -> list[str]:
        """The indicators that fired, as "window.<indicator>"."""
        return sorted({f"window.{f.check}" for f in self.fired})

    def fired_json(self) -> list[dict]:
        return [f.to_json() for f in self.fired]

    def to_json(self) -> dict:
        return {
            "damaged": self.damaged,
            "checked": self.checked,
            "rows": self.figures.rows,
            "rates": {k: round(v, 6) for k, v in self.figures.rates.items()},
            "tests": [f.to_json() for f in self.findings],
        }


@dataclass(frozen=True)
class WindowCheckConfig:
    """The window checks' thresholds (see the module docstring)."""

    tolerance: float = 0.3
    confidence: float = 0.9
    alpha: float = 0.005
    min_rows: int = 20
    # Rows of training a row needs after it before `unlearned` may judge it: half a window
    # (probe.every_examples / 2), so the end of a window, and a window closed early (on time, on
    # a live stream), are not judged on what the model had no time to learn.
    horizon: int = 500


def row_scales(x: np.ndarray) -> np.ndarray:
    """Each row's root mean square over its features (float64, shape=(n,))."""
    flat = x.reshape(len(x), -1)
    return np.sqrt(np.mean(np.square(flat, dtype=np.float64), axis=1))


def indicators(
    x: np.ndarray,
    y: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    learned: np.ndarray,
    *,
    confident: float,
    taught: set[int],
    scale_range: tuple[float, float],
) -> dict[str, np.ndarray]:
    """The per-row indicators (bool, shape=(n,)) of sampled rows in arrival order (module docstring)."""
    n = len(y)
    flat = x.reshape(n, -1)
    scale = row_scales(x)
    low, high = scale_range
    repeated = np.zeros(n, bool)
    repeated[1:] = np.all(flat[1:] == flat[:-1], axis=1)
    same_label = np.zeros(n, bool)
    same_label[1:] = y[1:] == y[:-1]
    known_class = np.isin(y, list(taught))  # a class the model was never taught can neither contradict nor fail it
    return {
        "contradicted": (confidence >= confident) & (predicted != y) & known_class,
        "unlearned": ~learned & known_class,
        "outlier": (scale < low) | (scale > high),
        "repeated": repeated,
        "same_label": same_label,
    }


def check_window(
    x: np.ndarray,
    y: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    learned: np.ndarray,
    history: WindowHistory,
    config: WindowCheckConfig,
    *,
    arrival: np.ndarray | None = None,
    trained: int | None = None,
) -> WindowVerdict:
    """Test a window's sampled rows (x, y), in arrival order, against `history` (module docstring).

    `predicted` and `confidence`: the last good model's class for each row and its
    probability for that class; `learned`: whether the candidate predicts each row's label.
    `arrival`: each sampled row's place among the `trained` rows of the window (default:
    the sample is the whole window).
    """
    n = len(y)
    arrival = np.arange(n) if arrival is None else np.asarray(arrival)
    trained = n if trained is None else trained
    checked = len(history) >= MIN_HISTORY and n > 0
    scale_range = history.scale_range() if checked else (-np.inf, np.inf)
    flags = indicators(
        x,
        y,
        predicted,
        confidence,
        np.asarray(learned, bool),
        confident=config.confidence,
        taught=history.classes,
        scale_range=scale_range,
    )
    rates = {name: float(flags[name].mean()) if n else 0.0 for name in INDICATORS}
    rates["known"] = float(np.mean(confidence >= config.confidence)) if n else 0.0  # a figure, not a test
    scales = row_scales(x) if n else np.zeros(1)
    low, high = (float(np.quantile(scales, q)) for q in (0.005, 0.995))
    figures = WindowFigures(n, rates, low, high, tuple(int(c) for c in np.unique(y)), trained)
    if not checked:
        return WindowVerdict(False, figures, checked=False)
    # Sampled rows with enough training after them to be judged on `unlearned` (they come first).
    learnable = int(np.count_nonzero(trained - 1 - arrival >= config.horizon))
    level = config.alpha / (len(INDICATORS) * BLOCKS)
    whole, blocks = [], []
    for name in INDICATORS:
        reference = history.reference(name)
        null_rate = min(reference + config.tolerance, 1.0)
        for depth in range(_LEVELS):
            parts = 2**depth
            for part, index in enumerate(np.array_split(np.arange(n), parts)):
                if name == "unlearned":  # a block is judged on its rows that had time to be learned
                    index = index[index < learnable]
                rows = flags[name][index]
                if len(rows) < config.min_rows:
                    continue
                count = int(rows.sum())
                p = upper_tail(count, len(rows), null_rate)
                finding = Finding(name, f"{part + 1}/{parts}", len(rows), count, reference, null_rate, p, level)
                if parts == 1:
                    whole.append(finding)
                elif finding.fired:
                    blocks.append(finding)
    findings = whole + blocks
    return WindowVerdict(any(f.fired for f in findings), figures, findings, learnable=learnable)


def resembling_rows(x: np.ndarray, segments: list[np.ndarray], quantile: float = 0.95) -> np.ndarray | None:
    """Which rows of `x` lie as close to one of `segments` (arrays of probe rows) as its own rows do.

    A row resembles a segment when its distance to the nearest of the segment's rows is at
    most the `quantile` of the segment's rows' distances to their own nearest other row
    (nearest-neighbour attribution, Euclidean): damage on inputs a segment knows lies
    among the segment's rows; a new input distribution lies apart. None without segments.
    """
    if not segments or not len(x):
        return None
    flat = x.reshape(len(x), -1).astype(np.float64)
    resembling = np.zeros(len(x), bool)
    for rows in segments:
        reference = rows.reshape(len(rows), -1).astype(np.float64)
        if len(reference) < 2:
            continue
        own = _squared_distances(reference, reference)
        np.fill_diagonal(own, np.inf)
        reach = np.quantile(own.min(axis=1), quantile)
        resembling |= _squared_distances(flat, reference).min(axis=1) <= reach
    return resembling


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of `a` and of `b` (shape=(len(a), len(b)))."""
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def upper_tail(k: int, n: int, rate: float) -> float:
    """P(X >= k), X ~ Binomial(n, rate): 1.0 when k <= 0 or when the rate allows any count (rate >= 1)."""
    if k <= 0 or rate >= 1.0:
        return 1.0
    return float(bdtrc(k - 1, n, rate))
