"""Which partitions of each topic one reader takes: all of them, or one process's share.

Several processes training one model read disjoint partitions, assigned explicitly
(`KafkaConsumer.assign`), never by a consumer group: a group's rebalance moves partitions
between members whenever one joins, leaves or stalls, and the processes, which move in
lockstep, would each lose and gain partitions mid-window. A `ProcessShare` is a fixed rule
every process computes alike from the partitions the broker shows: process i of N reads
partition p of each topic when p % N == i. So the shares cover every partition once, need
no coordination, and a restart with another N simply shares them out again; each resumes
from the positions the checkpoint holds for every partition.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class EveryPartition:
    """The one reader of a topic: it takes every partition."""

    def owns(self, topic: str, partition: int) -> bool:
        return True

    def select(self, topic: str, partitions: Iterable[int]) -> list[int]:
        """The partitions of `topic` this reader takes, of those given (in their order)."""
        return list(partitions)

    def describe(self) -> str:
        return "every partition"


@dataclass(frozen=True)
class ProcessShare:
    """Process `process` of `processes`: the partitions p of every topic with p % processes == process."""

    process: int
    processes: int

    def __post_init__(self):
        if not 0 <= self.process < self.processes:
            raise ValueError(
                f"`process` must be in 0 .. processes - 1 = {self.processes - 1}. "
                f"Got process={self.process}, processes={self.processes}."
            )

    def owns(self, topic: str, partition: int) -> bool:
        return partition % self.processes == self.process

    def select(self, topic: str, partitions: Iterable[int]) -> list[int]:
        return sorted(p for p in partitions if self.owns(topic, p))

    def describe(self) -> str:
        return f"partitions p % {self.processes} == {self.process} (process {self.process} of {self.processes})"


PartitionShare = EveryPartition | ProcessShare
EVERY_PARTITION = EveryPartition()
