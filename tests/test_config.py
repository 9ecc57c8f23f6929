"""The config file: the example round trip, one-line errors naming the key, --set, secrets, the CLI."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from continuity.cli import main
from continuity.config import (
    Config,
    ConfigError,
    ServiceConfig,
    StreamConfig,
    add_config_arguments,
    config_from_args,
    example_config,
    load_config,
)
from continuity.errors import UsageError

SECRET = "s3cr3t-Pa55w0rd"
TOKEN = "t0k3n-XYZ-admin"


def write(tmp_path: Path, text: str, name: str = "continuity.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=(), environ=None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides, environ={} if environ is None else environ)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# ---- defaults and the example ------------------------------------------------------------------


def test_example_config_loads_to_the_defaults(tmp_path):
    text = example_config()
    config = load_config(write(tmp_path, text), environ={})
    assert config == Config() == load_config(None, environ={})
    assert config.model == config.learner.model
    assert config.source_path == str(tmp_path / "continuity.toml")


def test_example_config_shows_every_section_and_key():
    data = tomllib.loads(example_config())
    # Optional keys without a default (golden, admin_token) and [stream.security] are shown
    # commented out, with a sample.
    defaults = Config().to_dict()
    for section, values in defaults.items():
        expected = {k for k, v in values.items() if v is not None}
        assert set(data[section]) == expected, section
    text = example_config()
    for sample in ("# golden = ", "# admin_token_env = ", "# [stream.security]", "# sasl_plain_password_env = "):
        assert sample in text


def test_example_config_targets_the_embedded_broker_and_the_produce_scenario():
    config = load_config(None, environ={})
    assert config.stream.bootstrap == "127.0.0.1:9092"
    assert config.stream.topics == ("digits",)
    assert (config.stream.codec, config.stream.feature_shape, config.stream.dtype) == ("binary", (8, 8, 1), "float32")
    settings = config.stream.kafka_settings()
    assert settings.bootstrap == "127.0.0.1:9092" and settings.group_id == "continuity"
    # Apache Kafka's defaults: the embedded broker's short session is set only where it runs.
    assert settings.session_timeout_ms == 45000 and settings.heartbeat_interval_ms == 3000
    assert settings.on_lost_positions == "halt"
    assert config.stream.kafka_settings(group=None).group_id is None
    assert config.stream.feature_spec().shape == (8, 8, 1)


def test_resolved_sections_map_onto_the_library_configs(tmp_path):
    path = write(
        tmp_path,
        """
[model]
kind = "cnn"
[learner]
learning_rate = 1      # an integer where a float is expected is fine
[replay]
capacity = 500
[ewc]
enabled = true
[probe]
holdout_fraction = 0.1
tolerance = 0.1
on_regression = "retry"
[stream]
group = ""
[checkpoints]
dir = "out/ckpt"
""",
    )
    config = load_config(path, environ={})
    assert config.learner.model.kind == "cnn" and config.model.kind == "cnn"
    assert config.learner.learning_rate == 1.0 and isinstance(config.learner.learning_rate, float)
    assert config.learner.replay.capacity == 500 and config.learner.ewc.enabled
    assert config.probe.holdout_fraction == 0.1
    assert (config.guard.tolerance, config.guard.on_regression) == (0.1, "retry")
    assert config.stream.group is None and config.stream.kafka_settings().group_id is None
    assert config.dead_letter_file == Path("out/ckpt/dead-letters.jsonl")
    assert config.quarantine_file == Path("out/ckpt/quarantine.jsonl")


def test_to_toml_reads_back_to_the_same_config(tmp_path):
    config = load_config(
        None,
        ["model.hidden=[64]", "stream.group=", "learner.learning_rate=0.0005", 'stream.topics=["a", "b"]'],
        environ={},
    )
    assert load_config(write(tmp_path, config.to_toml()), environ={}) == config


def test_digest_follows_training_settings_not_paths_or_ports():
    base = load_config(None, environ={})
    assert load_config(None, ["checkpoints.dir=elsewhere", "service.http_port=0"], environ={}).digest() == base.digest()
    # K updates per dispatch train the same model as one (tests/test_learner.py): a restart may change it.
    assert load_config(None, ["learner.steps_per_dispatch=4"], environ={}).digest() == base.digest()
    assert load_config(None, ["learner.learning_rate=0.01"], environ={}).digest() != base.digest()
    assert load_config(None, ["service.seed=1"], environ={}).digest() != base.digest()


# ---- errors: one line, naming the key ---------------------------------------------------------


def test_unknown_section(tmp_path):
    message = error_of(write(tmp_path, "[leaner]\nbatch_size = 3\n"))
    assert message.startswith(f"config {tmp_path / 'continuity.toml'}: [leaner]")
    assert "unknown section" in message and "did you mean 'learner'" in message


def test_unknown_key(tmp_path):
    message = error_of(write(tmp_path, "[learner]\nbatchsize = 3\n"))
    assert "[learner] batchsize: unknown key" in message and "did you mean 'batch_size'" in message


def test_top_level_key_is_an_unknown_section(tmp_path):
    assert "seed" in error_of(write(tmp_path, "seed = 3\n"))


@pytest.mark.parametrize(
    ("text", "key", "expected", "received"),
    [
        ('[learner]\nbatch_size = "32"\n', "[learner] batch_size", "expected an integer", "'32' (a string)"),
        ('[learner]\nlearning_rate = "fast"\n', "[learner] learning_rate", "expected a number", "'fast' (a string)"),
        ("[ewc]\nenabled = 1\n", "[ewc] enabled", "expected a boolean", "1 (an integer)"),
        ("[model]\nhidden = 256\n", "[model] hidden", "expected an array of integers", "256 (an integer)"),
        ("[stream]\ntopics = [1, 2]\n", "[stream] topics", "expected an array of strings", "[1, 2] (an array)"),
        ("[service]\nhttp_port = 80.5\n", "[service] http_port", "expected an integer", "80.5 (a float)"),
        ("[learner]\nbatch_size = true\n", "[learner] batch_size", "expected an integer", "True (a boolean)"),
    ],
)
def test_wrong_type(tmp_path, text, key, expected, received):
    message = error_of(write(tmp_path, text))
    assert f"{key}: {expected}" in message and f"got {received}" in message


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        ("[learner]\nbatch_size = 0\n", "[learner] batch_size", "must be >= 1. Got 0."),
        ("[learner]\nsteps_per_dispatch = 0\n", "[learner] steps_per_dispatch", "must be >= 1. Got 0."),
        ("[probe]\nholdout_fraction = 1.5\n", "[probe] holdout_fraction", "must be in (0, 1). Got 1.5."),
        ("[probe]\ntolerance = 2.0\n", "[probe] tolerance", "must be in [0, 1). Got 2.0."),
        ('[probe]\non_regression = "panic"\n', "[probe] on_regression", "'retry', 'quarantine', 'halt'. Got 'panic'."),
        ('[model]\nkind = "rnn"\n', "[model] kind", "must be one of 'mlp', 'cnn'. Got 'rnn'."),
        ('[stream]\ncodec = "xml"\n', "[stream] codec", "Got 'xml'."),
        ("[stream]\nfeature_shape = [8, 0]\n", "[stream] feature_shape", "positive integers"),
        ("[service]\nhttp_port = 70000\n", "[service] http_port", "must be in 0..65535. Got 70000."),
        ("[checkpoints]\nkeep_last = 0\n", "[checkpoints] keep_last", "must be >= 1"),
        ("[checkpoints]\nevery_seconds = -1\n", "[checkpoints] every_seconds", "must be >= 0"),
        ("[probe]\nevery_seconds = -5\n", "[probe] every_seconds", "must be a finite number >= 0. Got -5."),
        ("[ewc]\nstrength = 1.0\n", "[ewc]", "strength_min <= strength"),
        # Sizes of arrays past int32: JAX could not make them, with an error that names no setting.
        ("[learner]\nbatch_size = 99999999999999999999\n", "[learner] batch_size", "must be in 1..2147483647."),
        ("[replay]\ncapacity = 3000000000\n", "[replay] capacity", "must be in 0..2147483647. Got 3000000000."),
        ("[probe]\nwindow_sample = 2147483648\n", "[probe] window_sample", "must be in 0..2147483647."),
        ("[stream]\nfeature_shape = [3000000000]\n", "[stream] feature_shape", "positive integers"),
        ('[stream]\nbootstrap = "   "\n', "[stream] bootstrap", 'must be "host:port", or several joined by commas'),
        ('[stream]\nbootstrap = "kafka-1"\n', "[stream] bootstrap", "Got 'kafka-1'."),
        ('[stream]\nbootstrap = "kafka-1:9092,"\n', "[stream] bootstrap", "Got 'kafka-1:9092,'."),
    ],
)
def test_out_of_range(tmp_path, text, key, detail):
    message = error_of(write(tmp_path, text))
    assert f"{key}: " in message and detail in message


def test_bad_toml_names_the_line(tmp_path):
    message = error_of(write(tmp_path, "[learner]\nbatch_size = 32\nlearning_rate = fast\n"))
    assert "invalid TOML" in message and "line 3" in message


def test_arrays_or_inline_tables_nested_thousands_deep_are_invalid_toml_not_a_recursion_error(tmp_path):
    arrays = write(tmp_path, "[learner]\nbatch_size = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert error_of(arrays) == f"config {arrays}: invalid TOML: arrays or inline tables nested too deeply"
    tables = write(tmp_path, "[learner]\nbatch_size = " + "{a = " * 100_000 + "}" * 100_000 + "\n", "t.toml")
    assert error_of(tables).endswith("invalid TOML: arrays or inline tables nested too deeply")
    deep = "[" * 50_000 + "]" * 50_000  # as --set's value: not a TOML value, so the text itself
    assert "[learner] batch_size (from --set): expected an integer" in error_of(None, [f"learner.batch_size={deep}"])


def test_a_config_saved_with_a_utf8_byte_order_mark_loads_as_without_one(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[learner]\nbatch_size = 8\n")
    assert load_config(path, environ={}).learner.batch_size == 8


def test_a_pipe_a_device_or_a_file_too_big_to_be_a_config_is_refused_before_it_is_read(tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would wait for a writer for ever
    assert error_of(fifo) == f"config {fifo}: is not a regular file (a pipe or device?), expected a TOML file"
    assert error_of(Path("/dev/zero")).endswith("is not a regular file (a pipe or device?), expected a TOML file")
    big = write(tmp_path, "# " + "x" * (1 << 20) + "\n")
    assert error_of(big).endswith("bytes; a config is at most 1,048,576")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    assert error_of(missing) == f"config {missing}: no such file"


def test_missing_environment_variable_for_a_secret(tmp_path):
    path = write(tmp_path, '[stream.security]\nsecurity_protocol = "SASL_SSL"\nsasl_plain_password_env = "KAFKA_PW"\n')
    message = error_of(path, environ={})
    assert "[stream.security] sasl_plain_password_env: environment variable KAFKA_PW is not set" in message
    message = error_of(write(tmp_path, '[service]\nadmin_token_env = "ADMIN_TOKEN"\n', "b.toml"), environ={})
    assert "[service] admin_token_env: environment variable ADMIN_TOKEN is not set" in message


def test_unknown_security_option(tmp_path):
    message = error_of(write(tmp_path, '[stream.security]\nsasl_password = "x"\n'))
    assert "[stream.security] sasl_password: unknown security option" in message
    assert "did you mean 'ssl_password'" in message


def test_non_loopback_bind_without_token_is_refused(tmp_path):
    message = error_of(write(tmp_path, '[service]\nhttp_host = "0.0.0.0"\n'))
    assert "[service] http_host: refusing to expose admin endpoints on 0.0.0.0 without service.admin_token" in message
    config = load_config(
        write(tmp_path, '[service]\nhttp_host = "0.0.0.0"\nadmin_token_env = "T"\n', "ok.toml"), environ={"T": TOKEN}
    )
    assert config.service.admin_token == TOKEN
    for host in ("127.0.0.1", "127.5.0.1", "::1", "localhost"):
        assert ServiceConfig(http_host=host).admin_token is None
    with pytest.raises(ValueError, match="refusing"):
        ServiceConfig(http_host="example.com")


def test_config_error_is_a_usage_error():
    assert issubclass(ConfigError, UsageError)


# ---- --set ---------------------------------------------------------------------------------------


def test_set_overrides_numbers_booleans_lists_and_strings(tmp_path):
    path = write(tmp_path, "[learner]\nbatch_size = 8\n")
    config = load_config(
        path,
        [
            "learner.batch_size=64",  # beats the file
            "learner.learning_rate=3e-4",
            "ewc.enabled=true",
            "model.hidden=[32, 16]",
            "stream.bootstrap=10.0.0.5:9093",  # not TOML: a bare string
            'stream.group="team-a"',
            "stream.topics=events",  # one string for a list of strings: one topic
            "service.http_port=0",
        ],
        environ={},
    )
    assert config.learner.batch_size == 64 and config.learner.learning_rate == 3e-4
    assert config.learner.ewc.enabled is True and config.model.hidden == (32, 16)
    assert config.stream.bootstrap == "10.0.0.5:9093" and config.stream.group == "team-a"
    assert config.stream.topics == ("events",) and config.service.http_port == 0


def test_set_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"--set learner\.batchsize: \[learner\] batchsize: unknown key"):
        load_config(None, ["learner.batchsize=3"], environ={})
    with pytest.raises(ConfigError, match=r"--set lerner\.batch_size: \[lerner\]: unknown section"):
        load_config(None, ["lerner.batch_size=3"], environ={})
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        load_config(None, ["learner.batch_size"], environ={})
    with pytest.raises(ConfigError, match=r"\[learner\] batch_size \(from --set\): expected an integer, got 'many'"):
        load_config(None, ["learner.batch_size=many"], environ={})
    with pytest.raises(ConfigError, match=r"\[learner\] batch_size \(from --set\): must be >= 1"):
        load_config(None, ["learner.batch_size=0"], environ={})


def test_config_arguments_on_a_parser(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    path = write(tmp_path, "[replay]\ncapacity = 100\n")
    args = parser.parse_args(["--config", str(path), "--set", "replay.capacity=200", "--set", "ewc.enabled=true"])
    config = config_from_args(args)
    assert config.learner.replay.capacity == 200 and config.learner.ewc.enabled
    assert config_from_args(parser.parse_args([])) == Config()


# ---- secrets ---------------------------------------------------------------------------------------


def test_secrets_never_appear_in_output_or_errors(tmp_path):
    environ = {"KAFKA_PW": SECRET, "ADMIN": TOKEN}
    path = write(
        tmp_path,
        """
[stream.security]
security_protocol = "SASL_SSL"
sasl_mechanism = "PLAIN"
sasl_plain_username = "continuity"
sasl_plain_password_env = "KAFKA_PW"
[service]
http_host = "0.0.0.0"
admin_token_env = "ADMIN"
""",
    )
    config = load_config(path, environ=environ)
    assert config.stream.security["sasl_plain_password"] == SECRET and config.service.admin_token == TOKEN
    assert config.stream.kafka_settings().security["sasl_plain_password"] == SECRET
    shown = [config.to_toml(), repr(config), str(config.to_dict()), repr(config.stream.kafka_settings())]
    for text in shown:
        assert SECRET not in text and TOKEN not in text
    assert 'sasl_plain_password = "***"' in config.to_toml() and 'admin_token = "***"' in config.to_toml()
    assert SECRET in config.to_toml(redact=False)
    # A wrong type given to a secret names the type, never the value; so does an error elsewhere.
    for overrides in (
        ['stream.security.sasl_plain_password=["' + SECRET + '"]'],
        ["service.admin_token=[1]"],
        ["learner.batch_size=0"],
    ):
        message = error_of(path, overrides, environ)
        assert SECRET not in message and TOKEN not in message


@pytest.mark.parametrize(
    "text, overrides, key",
    [
        ('[stream.security]\nsasl_plain_password = "{secret}"\n', [], "sasl_plain_password"),
        ('[stream.security]\nssl_password = "{secret}"\n', [], "ssl_password"),
        ('[service]\nadmin_token = "{secret}"\n', [], "admin_token"),
        ("", ["service.admin_token={secret}"], "admin_token"),
        ("", ["stream.security.sasl_plain_password={secret}"], "sasl_plain_password"),
    ],
    ids=["password-in-file", "ssl-password-in-file", "token-in-file", "token-by-set", "password-by-set"],
)
def test_a_secret_given_as_a_value_is_exit_2_naming_the_env_form(tmp_path, capsys, text, overrides, key):
    path = write(tmp_path, text.format(secret=SECRET))
    arguments = ["config", "check", "--config", str(path)]
    for override in overrides:
        arguments += ["--set", override.format(secret=SECRET)]
    assert main(arguments) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    what = "password" if "password" in key else "token"
    assert f'give {key}_env = "VAR" and put the {what} in $VAR' in captured.err
    assert ("(from --set)" in captured.err) == bool(overrides)
    assert SECRET not in captured.err


def test_an_empty_secret_value_means_none_and_is_no_error(tmp_path):
    assert load_config(write(tmp_path, '[service]\nadmin_token = ""\n'), environ={}).service.admin_token is None


# ---- through the CLI ------------------------------------------------------------------------------


def test_cli_config_example_prints_a_loadable_config(tmp_path, capsys):
    assert main(["config", "example"]) == 0
    path = write(tmp_path, capsys.readouterr().out)
    assert load_config(path, environ={}) == Config()


def test_cli_config_check_prints_the_resolved_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CONTINUITY_TEST_TOKEN", TOKEN)
    path = write(tmp_path, '[service]\nadmin_token_env = "CONTINUITY_TEST_TOKEN"\n')
    assert main(["config", "check", "--config", str(path), "--set", "learner.batch_size=7"]) == 0
    out = capsys.readouterr().out
    assert "batch_size = 7" in out and TOKEN not in out
    assert main(["config", "check", "--config", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"admin_token": "***"' in out and TOKEN not in out


def test_cli_config_check_on_a_bad_file_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, '[learner]\nbatch_size = "many"\n')
    assert main(["config", "check", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"continuity: error: config {path}: [learner] batch_size: expected an integer, got 'many' (a string)\n"
    )


@pytest.mark.slow  # a subprocess
def test_installed_command_on_a_bad_file_exits_2_with_one_line(tmp_path):
    # An unknown section fails before JAX is imported, which keeps this subprocess quick.
    path = write(tmp_path, "[learner]\nbatch_size = 8\n[servce]\nhttp_port = 1\n")
    executable = Path(sys.executable).parent / "continuity"
    done = subprocess.run(
        [str(executable), "config", "check", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"continuity: error: config {path}: [servce]: unknown section; expected one of: stream, model, learner, "
        "replay, ewc, probe, checkpoints, service, publish, scale (did you mean 'service'?)"
    ]


def test_stream_config_validates_when_built_in_code():
    with pytest.raises(ValueError, match="stream.dead_letters"):
        StreamConfig(dead_letters="kafka")
    with pytest.raises(ValueError, match="stream.security"):
        StreamConfig(security={"password": "x"})
    assert SECRET not in repr(StreamConfig(security={"sasl_plain_password": SECRET}))


def test_an_unknown_lost_positions_policy_is_a_one_line_error_naming_the_choices(tmp_path):
    message = error_of(write(tmp_path, '[stream]\non_lost_positions = "skip"\n'))
    assert "on_lost_positions" in message and "'halt', 'earliest', 'latest'" in message and "'skip'" in message
    config = load_config(None, ['stream.on_lost_positions="earliest"'], environ={})
    assert config.stream.kafka_settings().on_lost_positions == "earliest"
