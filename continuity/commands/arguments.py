"""Argument types shared by the command modules: each rejects bad input with a message argparse prints on one line."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def partitions(text: str) -> int:
    """A topic's partition count: Kafka's protocol carries it as an int32."""
    value = positive_int(text)
    if value > 2**31 - 1:
        raise argparse.ArgumentTypeError(f"expected a partition count in 1..2147483647, got {value}")
    return value


def bootstrap(text: str) -> str:
    """A broker's "host:port", or several joined by commas, checked as the config checks
    `stream.bootstrap`: without it a typo waits out kafka-python's timeout (~30 s)."""
    from continuity.config import checked_bootstrap

    try:
        return checked_bootstrap(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def topic(text: str) -> str:
    """A Kafka topic name (stream.kafka.topic_name_problem)."""
    from continuity.stream.kafka import topic_name_problem

    problem = topic_name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def device_counts(text: str) -> tuple[int, ...]:
    """Device counts written `1,2,4`: positive integers, each once."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected device counts like 1,2,4, got {text!r}") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"expected distinct positive device counts like 1,2,4, got {text!r}")
    return counts


def replay_layouts(text: str) -> tuple[str, ...]:
    """[scale] replay_layout values written `replicated,sharded`: each once."""
    layouts = tuple(part.strip() for part in text.split(","))
    if not set(layouts) <= {"replicated", "sharded"} or len(set(layouts)) != len(layouts):
        raise argparse.ArgumentTypeError(f"expected replay layouts like replicated,sharded, got {text!r}")
    return layouts


def rate(text: str) -> float:
    """A positive rate per second, written `200` or `200/s`."""
    raw = text[:-2] if text.endswith("/s") else text
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate like 200 or 200/s, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive rate, got {text!r}")
    return value


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {value}")
    return value


def add_set_argument(parser: argparse.ArgumentParser, help: str, *, dest: str = "set") -> None:
    """Repeatable --set SECTION.KEY=VALUE (a list, or None when not given), for every command taking overrides."""
    parser.add_argument("--set", dest=dest, action="append", default=None, metavar="SECTION.KEY=VALUE", help=help)
