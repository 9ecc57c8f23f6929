"""Worked examples: models and streams of one's own, trained by `continuity serve` unchanged."""
