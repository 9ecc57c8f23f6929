"""Continuity: an always-on continual-learning streaming trainer."""

from continuity.errors import UsageError

__all__ = ["UsageError"]
