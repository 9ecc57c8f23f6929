"""Records in: Kafka topics, recorded Parquet streams and synthetic scenarios, decoded and batched.

Sources (`KafkaSource`, `FileSource`, `ScenarioSource`) hand out raw records with their
`Position`s; a codec (`json` or `binary`, see stream.codecs for the wire formats) turns
them into validated `ExampleBlock`s or `DeadLetter`s; `Ingest` runs polling and decoding
on a background thread; `Batcher` makes fixed-shape `Batch`es (pad + mask) with the
`Positions` they reach and diverts a deterministic `Holdout` share to the probe.
`EmbeddedBroker` runs a Kafka-compatible broker (Tansu) for tests and the demo.
This package imports nothing from the rest of the project.
"""

from stream.batcher import NO_SEGMENT, Batch, Batcher, Holdout, Ownership
from stream.broker import BrokerError, EmbeddedBroker, free_port
from stream.codecs import CODECS, BinaryCodec, Codec, CodecError, FeatureSpec, JsonCodec, encode_binary, encode_json, make_codec
from stream.deadletters import DeadLetter, DeadLetterSink, JsonLinesDeadLetters, KafkaDeadLetters, MemoryDeadLetters, read_dead_letters
from stream.examples import Example, ExampleBlock
from stream.ingest import Ingest, batches
from stream.kafka import KafkaSettings, KafkaSource, KafkaSourceError, create_topic, produce_records
from stream.records import PartitionKey, PartitionPosition, PartitionRecords, Position, Positions, Record
from stream.recording import RecordingWriter, record_topic
from stream.sources import FileSource, ScenarioSource, Source, SourceError

__all__ = [
    "NO_SEGMENT", "Batch", "Batcher", "Holdout", "Ownership",
    "BrokerError", "EmbeddedBroker", "free_port",
    "CODECS", "BinaryCodec", "Codec", "CodecError", "FeatureSpec", "JsonCodec", "encode_binary", "encode_json", "make_codec",
    "DeadLetter", "DeadLetterSink", "JsonLinesDeadLetters", "KafkaDeadLetters", "MemoryDeadLetters", "read_dead_letters",
    "Example", "ExampleBlock",
    "Ingest", "batches",
    "KafkaSettings", "KafkaSource", "KafkaSourceError", "create_topic", "produce_records",
    "PartitionKey", "PartitionPosition", "PartitionRecords", "Position", "Positions", "Record",
    "RecordingWriter", "record_topic",
    "FileSource", "ScenarioSource", "Source", "SourceError",
]
