"""The usual online learners, judged test-then-train on the records `bench prequential` trains on.

Runs River's (Montiel et al. 2021) Hoeffding tree (Domingos & Hulten 2000), adaptive random
forest (Gomes et al. 2017) and logistic regression prequentially over a drift stream's
events.jsonl (written by `continuity bench prequential --keep DIR`): each event is first
predicted, then learned, as MOA's and River's prequential evaluation does. River is not a
dependency of this project; run this with a Python that has it:

    python -m venv /tmp/rivervenv && /tmp/rivervenv/bin/pip install river
    /tmp/rivervenv/bin/python benchmarks/river_baseline.py DIR/events.jsonl --json out.json

Integer-coded categories (Agrawal's elevel, car, zipcode) are given to the trees as nominal
values and one-hot encoded for logistic regression; every number is standardised for it
(running mean and variance). River's learners see every record; `bench prequential` holds
out `probe.holdout_fraction` (10%) of them for its probe and counts the rest.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CATEGORICAL = ("elevel", "car", "zipcode")  # Agrawal's integer codes
NOT_FEATURES = ("label", "concept")


def _learners() -> dict:
    from river import compose, forest, linear_model, preprocessing, tree  # type: ignore[import-not-found]

    def logistic():
        numbers = compose.SelectType(float, int) | preprocessing.StandardScaler()
        categories = compose.SelectType(str) | preprocessing.OneHotEncoder()
        return (numbers + categories) | linear_model.LogisticRegression()

    return {
        "hoeffding_tree": tree.HoeffdingTreeClassifier,
        "adaptive_random_forest": lambda: forest.ARFClassifier(seed=0),
        "logistic_regression": logistic,
    }


def run(events_path: Path, only: tuple[str, ...] = ()) -> dict:
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    rows = []
    for event in events:
        x = {k: (str(v) if k in CATEGORICAL else v) for k, v in event.items() if k not in NOT_FEATURES}
        rows.append((x, int(event["label"]), event.get("concept")))
    results = {}
    for name, build in _learners().items():
        if only and name not in only:
            continue
        model = build()
        right, per_concept = 0, dict[str, tuple[int, int]]()
        started = time.perf_counter()
        for x, y, concept in rows:
            correct = model.predict_one(x) == y  # test, then train
            model.learn_one(x, y)
            right += correct
            hits, seen = per_concept.get(concept, (0, 0))
            per_concept[concept] = (hits + correct, seen + 1)
        seconds = time.perf_counter() - started
        results[name] = {
            "prequential_accuracy": right / len(rows),
            "concepts": {c: hits / seen for c, (hits, seen) in per_concept.items()},
            "examples_per_second": len(rows) / seconds,
        }
    return {"events": str(events_path), "examples": len(rows), "learners": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", type=Path, help="events.jsonl from `continuity bench prequential --keep DIR`")
    parser.add_argument("--only", action="append", default=[], help="run only these learners")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = run(args.events, tuple(args.only))
    for name, figures in result["learners"].items():
        print(f"{name:<24} {figures['prequential_accuracy']:.4f}  ({figures['examples_per_second']:,.0f} examples/s)")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
