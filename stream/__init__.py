"""Records in: Kafka topics, recorded Parquet streams and synthetic scenarios, decoded and batched.

Sources (`KafkaSource`, `FileSource`, `ScenarioSource`) hand out raw records with their
`Position`s; a codec (`json` or `binary`, see stream.codecs for the wire formats) turns
them into validated `ExampleBlock`s or `DeadLetter`s; `Ingest` runs polling and decoding
on a background thread; `Batcher` makes fixed-shape `Batch`es (pad + mask) with the
`Positions` they reach and diverts a deterministic `Holdout` share to the probe.
`EmbeddedBroker` runs a Kafka-compatible broker (Tansu) for tests and the demo.
This package imports nothing from the rest of the project.
"""

from continuity.stream.batcher import NO_SEGMENT, Batch, Batcher, Holdout, Ownership
from continuity.stream.broker import BrokerError, EmbeddedBroker, free_port
from continuity.stream.codecs import (
    CODECS,
    BinaryCodec,
    Codec,
    CodecError,
    FeatureSpec,
    JsonCodec,
    encode_binary,
    encode_json,
    make_codec,
)
from continuity.stream.deadletters import (
    DeadLetter,
    DeadLetterSink,
    JsonLinesDeadLetters,
    KafkaDeadLetters,
    MemoryDeadLetters,
    read_dead_letters,
)
from continuity.stream.examples import Example, ExampleBlock
from continuity.stream.ingest import Ingest, batches
from continuity.stream.kafka import (
    KafkaLogLimit,
    KafkaSettings,
    KafkaSlowStepNote,
    KafkaSource,
    KafkaSourceError,
    TopicIdentity,
    create_topic,
    produce_records,
)
from continuity.stream.recording import RecordingWriter, record_topic
from continuity.stream.records import PartitionKey, PartitionPosition, PartitionRecords, Position, Positions, Record
from continuity.stream.shares import EveryPartition, PartitionShare, ProcessShare
from continuity.stream.sources import (
    FileSource,
    LostPosition,
    LostPositionsError,
    ScenarioSource,
    Source,
    SourceError,
)

__all__ = [
    "CODECS",
    "NO_SEGMENT",
    "Batch",
    "Batcher",
    "BinaryCodec",
    "BrokerError",
    "Codec",
    "CodecError",
    "DeadLetter",
    "DeadLetterSink",
    "EmbeddedBroker",
    "EveryPartition",
    "Example",
    "ExampleBlock",
    "FeatureSpec",
    "FileSource",
    "Holdout",
    "Ingest",
    "JsonCodec",
    "JsonLinesDeadLetters",
    "KafkaDeadLetters",
    "KafkaLogLimit",
    "KafkaSettings",
    "KafkaSlowStepNote",
    "KafkaSource",
    "KafkaSourceError",
    "LostPosition",
    "LostPositionsError",
    "MemoryDeadLetters",
    "Ownership",
    "PartitionKey",
    "PartitionPosition",
    "PartitionRecords",
    "PartitionShare",
    "Position",
    "Positions",
    "ProcessShare",
    "Record",
    "RecordingWriter",
    "ScenarioSource",
    "Source",
    "SourceError",
    "TopicIdentity",
    "batches",
    "create_topic",
    "encode_binary",
    "encode_json",
    "free_port",
    "make_codec",
    "produce_records",
    "read_dead_letters",
    "record_topic",
]
