"""Reproducible speed and learning-quality benchmarks; `make bench` runs them all (results in BENCHMARKS.md)."""

# The continual-learning strategies `bench cl` compares; here, free of JAX, so the CLI can list them cheaply.
STRATEGIES = ("naive", "ewc", "replay", "ewc+replay", "joint")
