"""The config on pydantic: declared once, generated reference, cross-field checks, and what the factory checks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from continuity.cli import main
from continuity.config import Config, ConfigError, load_config, readme_reference

README = Path(__file__).resolve().parent.parent / "README.md"


def tiny_model(*, rngs: nnx.Rngs, inputs, outputs: int, width: int = 16) -> nnx.Module:
    """A user's model, named by import path in the tests below (`<this module>:tiny_model`)."""
    return nnx.Sequential(
        lambda x: x.reshape(x.shape[0], -1),
        nnx.Linear(int(inputs.size), width, rngs=rngs),
        nnx.relu,
        nnx.Linear(width, outputs, rngs=rngs),
    )


def not_a_module(*, rngs, inputs, outputs):
    return "a string"


def takes_nothing():
    return None


FACTORY = f"{__name__}:tiny_model"


class EventsModel(nnx.Module):
    """A user's model over named-field events: one categorical id embedded, beside the numeric
    fields (the spec packs them into one `numeric` input)."""

    def __init__(self, inputs: dict, outputs: int, ids: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(ids, 4, rngs=rngs)
        self.head = nnx.Linear(4 + int(inputs["numeric"].size), outputs, rngs=rngs)

    def __call__(self, x: dict):
        return self.head(jnp.concatenate([self.embed(x["country"]), x["numeric"]], axis=-1))


EVENTS_INPUTS: list[dict] = []  # what events_model was given, each time it was built


def events_model(*, rngs: nnx.Rngs, inputs: dict, outputs: int, ids: int) -> EventsModel:
    EVENTS_INPUTS.append({name: str(spec.dtype) for name, spec in inputs.items()})
    return EventsModel(inputs, outputs, ids, rngs=rngs)


EVENTS = """[stream]
codec = "fields"
num_classes = 2
[stream.fields]
label = "clicked"
amount = { kind = "numeric" }
country = { kind = "categorical", buckets = 8 }
"""


def check_fails(tmp_path, capsys, text: str, overrides=()) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    arguments = ["config", "check", "--config", str(path)]
    for override in overrides:
        arguments += ["--set", override]
    assert main(arguments) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    return captured.err


@pytest.mark.slow  # a subprocess
def test_importing_the_config_imports_no_jax():
    code = (
        "import sys; import continuity.config as c; c.load_config(None, environ={}); c.example_config(); "
        "print('jax' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_readme_config_reference_is_the_generated_example():
    # Regenerate with `make config-reference` after changing a section's fields or descriptions.
    assert readme_reference() in README.read_text()


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ('[model]\nkind = "cnn"\n[stream]\nfeature_shape = [20]\n', ["[model] kind: 'cnn' needs image-shaped", "[20]"]),
        ('[learner]\ntask = "regression"\n[stream]\nnum_classes = 10\n', ["[stream] num_classes: must be left out"]),
        ('[learner]\ntask = "multilabel"\n', ["[stream] num_labels: is required", '"multilabel"']),
        ("[stream]\nnum_labels = 3\n", ["[stream] num_labels: must be left out", '"classification"']),
        ("[stream]\nnum_classes = 1\n", ["[stream] num_classes: must be >= 2"]),
        ('[learner]\ntask = "regression"\n[replay]\nkind = "class_balanced"\n', ["[replay] kind: 'class_balanced'"]),
        (
            '[stream]\ncodec = "json"\n[stream.inputs.tokens]\nshape = [4]\ndtype = "int32"\n',
            ["[model] kind: the 'mlp' preset takes one feature array", "model.factory"],
        ),
        (
            f'[model]\nfactory = "{FACTORY}"\n[stream.inputs.tokens]\nshape = [4]\ndtype = "int32"\n',
            ['[stream] codec: named inputs need codec = "json"'],
        ),
        (
            '[learner.schedule]\nkind = "warmup_cosine"\nwarmup_steps = 10\ndecay_steps = 5\n',
            ["decay_steps: must be >"],
        ),
        ("[model]\nfactory = 'not a path'\n", ['[model] factory: expected "package.module:callable"']),
        ("[model.kwargs]\nwidth = 3\n", ["[model] kwargs: keyword arguments are for a model factory"]),
    ],
)
def test_contradictory_settings_are_one_line_exit_2_at_config_check(tmp_path, capsys, text, pieces):
    err = check_fails(tmp_path, capsys, text)
    for piece in pieces:
        assert piece in err


def test_a_model_named_by_import_path_with_kwargs_checks_and_builds(tmp_path, capsys):
    from continuity.factory import learner_from_config

    path = tmp_path / "c.toml"
    path.write_text(f'[model]\nfactory = "{FACTORY}"\n[model.kwargs]\nwidth = 8\n')
    assert main(["config", "check", "--config", str(path)]) == 0
    config = load_config(path, environ={})
    assert config.model.kwargs == {"width": 8} and f'factory = "{FACTORY}"' in capsys.readouterr().out
    params = learner_from_config(config).init(0).params
    assert any(getattr(leaf, "shape", None) == (64, 8) for leaf in __import__("jax").tree.leaves(params))


@pytest.mark.parametrize(
    ("model", "pieces"),
    [
        ('factory = "no_such_module_xyz:build"', ["[model] factory: cannot import 'no_such_module_xyz'"]),
        (f'factory = "{__name__}:tiny_modle"', ["[model] factory: ", "has no attribute 'tiny_modle'", "tiny_model"]),
        (f'factory = "{__name__}:README"', ["[model] factory: ", "is a PosixPath, not a callable"]),
        (f'factory = "{__name__}:not_a_module"', ["[model] factory: ", "must return an nnx.Module. Got str."]),
        (f'factory = "{__name__}:takes_nothing"', ["[model] factory: ", "cannot be called as factory(rngs="]),
        (f'factory = "{FACTORY}"\n[model.kwargs]\ndepth = 3', ["[model] kwargs: ", "depth"]),
        (f'factory = "{FACTORY}"\n[model.kwargs]\nwidth = "wide"', ["[model] factory: building", "TypeError"]),
    ],
)
def test_a_bad_model_factory_is_one_line_exit_2_naming_the_key(tmp_path, capsys, model, pieces):
    err = check_fails(tmp_path, capsys, f"[model]\n{model}\n")
    for piece in pieces:
        assert piece in err


def test_any_optax_optimizer_by_name_with_arguments_clipping_and_a_schedule():
    from continuity.factory import build_optimizer

    config = load_config(
        None,
        [
            'learner.optimizer="adamw"',
            "learner.optimizer_args.weight_decay=0.01",
            "learner.optimizer_args.b1=0.8",
            "learner.clip_global_norm=1.0",
            'learner.schedule.kind="warmup_cosine"',
            "learner.schedule.warmup_steps=10",
            "learner.schedule.decay_steps=100",
        ],
        environ={},
    )
    assert config.learner.optimizer_args == {"weight_decay": 0.01, "b1": 0.8}
    assert isinstance(build_optimizer(config.learner), optax.GradientTransformation)
    for name in ("sgd", "rmsprop", "lion", "adam"):
        assert isinstance(build_optimizer(load_config(None, [f"learner.optimizer={name}"], environ={}).learner), tuple)


@pytest.mark.parametrize(
    ("overrides", "pieces"),
    [
        (["learner.optimizer=adamx"], ["[learner] optimizer: optax has no optimizer 'adamx'", "did you mean 'adam"]),
        (["learner.optimizer_args.weight_dekay=0.1"], ["[learner] optimizer_args: optax.adam rejects them"]),
        (["learner.optimizer_args.learning_rate=0.1"], ["[learner] optimizer_args: give the learning rate as"]),
        (["learner.optimizer=Adam"], ["[learner] optimizer: optax has no optimizer 'Adam'"]),
    ],
)
def test_a_bad_optimizer_is_one_line_exit_2_naming_the_key(tmp_path, capsys, overrides, pieces):
    err = check_fails(tmp_path, capsys, "", overrides)
    for piece in pieces:
        assert piece in err


def test_unknown_keys_in_nested_tables_suggest_the_close_one(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[learner.schedule]\nknd = "cosine"\n')
    with pytest.raises(ConfigError, match=r"\[learner.schedule\] knd: unknown key; .*did you mean 'kind'"):
        load_config(path, environ={})
    path.write_text('[stream]\ncodec = "json"\n[stream.inputs.tokens]\nshap = [3]\n')
    with pytest.raises(ConfigError, match=r"\[stream.inputs.tokens\] shap: unknown key.*did you mean 'shape'"):
        load_config(path, environ={})


def test_the_keys_other_changes_wire_have_their_defaults_and_bounds():
    config = Config()
    assert config.learner.steps_per_dispatch == 8 and config.service.predict_max_rows == 256
    assert config.publish.dir == "" and config.stream.inputs == {} and config.model.factory is None
    for override in ("learner.steps_per_dispatch=0", "service.predict_max_rows=0"):
        with pytest.raises(ConfigError, match=r"\(from --set\): must be >= 1"):
            load_config(None, [override], environ={})
    config = load_config(
        None,
        [
            f"model.factory={FACTORY}",
            'stream.codec="json"',
            "stream.inputs.tokens.shape=[16]",
            'stream.inputs.tokens.dtype="int32"',
            "stream.inputs.numeric.shape=[4]",
            "publish.dir=published",
        ],
        environ={},
    )
    assert config.stream.inputs["tokens"].dtype == "int32" and config.stream.inputs["numeric"].shape == (4,)
    assert config.publish.dir == "published"
    assert load_config(None, [], environ={}).digest() != config.digest()


def test_the_digest_is_the_same_from_config_check_and_for_the_service(tmp_path, capsys):
    import json

    path = tmp_path / "c.toml"
    path.write_text("[learner]\nbatch_size = 16\n")
    assert main(["config", "check", "--config", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["digest"]
    assert shown == load_config(path, environ={}).digest() == load_config(path, environ={}).digest()


def test_named_field_events_train_a_model_of_your_own_with_their_ids_as_int32(tmp_path):
    from continuity.factory import learner_from_config

    path = tmp_path / "c.toml"
    path.write_text(EVENTS + f'[model]\nfactory = "{__name__}:events_model"\n[model.kwargs]\nids = 8\n')
    learner = learner_from_config(load_config(path, environ={}))
    state = learner.init(0)
    assert learner._model_name == "EventsModel"
    assert state.params["embed"]["embedding"].shape == (8, 4)
    assert EVENTS_INPUTS and all(seen == {"numeric": "float32", "country": "int32"} for seen in EVENTS_INPUTS)


def test_the_cnn_preset_over_named_field_events_is_one_line_exit_2(tmp_path, capsys):
    err = check_fails(tmp_path, capsys, EVENTS + '[model]\nkind = "cnn"\n')
    assert "[model] kind: " in err and "need the 'mlp' preset" in err and "model.factory" in err


def test_the_published_description_of_the_mlp_over_events_rebuilds_the_model_the_service_trains(tmp_path):
    import jax
    from flax import nnx as nnx_

    from continuity.factory import learner_from_config, model_inputs, resolve, service_model, task_for

    path = tmp_path / "c.toml"
    path.write_text(EVENTS)
    config = load_config(path, environ={})
    _, description = service_model(config)
    assert description["kwargs"]["vocabulary_sizes"] == {"country": 8}
    rebuilt = resolve(description["factory"])(
        rngs=nnx_.Rngs(0), inputs=model_inputs(config), outputs=task_for(config).outputs, **description["kwargs"]
    )
    trained = learner_from_config(config).init(0).params
    shapes = jax.tree.map(lambda a: a.shape, nnx_.to_pure_dict(nnx_.state(rebuilt, nnx_.Param)))
    assert shapes == jax.tree.map(lambda a: a.shape, trained)


def test_a_replay_buffer_larger_than_the_memory_is_one_line_exit_2_naming_replay_capacity_before_allocating(
    tmp_path, capsys, monkeypatch
):
    # 10**9 examples of 4,096 floats: 16.4 TB, more than any machine the tests run on.
    err = check_fails(tmp_path, capsys, "[replay]\ncapacity = 1_000_000_000\n[stream]\nfeature_shape = [4096]\n")
    assert err.startswith(
        f"continuity: error: config {tmp_path / 'c.toml'}: [replay] capacity: a replay buffer of 1,000,000,000 "
        "examples needs 16.4 TB (16.4 kB an example), more than the "
    )
    assert "of this machine's memory holds beside the model's state and a dispatch's batches (" in err
    assert err.endswith("Got 1000000000.\n")

    # The figures, on a machine said to have 1 GB: 10**7 rows of 64 floats, a label and a bucket,
    # beside the default MLP's state (85,002 float32 parameters, three times: the parameters, EWC's
    # anchor and Fisher; Adam's two moments of them and its int32 step count: 1,700,044 bytes) and
    # a dispatch's stack held twice (8 micro-batches of 32 rows of 64 floats, a label and a mask).
    monkeypatch.setattr("continuity.factory.host_memory", lambda: 10**9)
    err = check_fails(tmp_path, capsys, "[replay]\ncapacity = 10_000_000\n")
    beside = 1_700_044 + 2 * 8 * 32 * (64 * 4 + 4 + 1)
    assert (
        "needs 2.6 GB (264 bytes an example), more than the 1.0 GB of this machine's memory holds beside the "
        "model's state and a dispatch's batches (1.8 MB): at most " in err
    )
    fit = int(re.search(r"at most ~([\d,]+) examples fit\. Got 10000000\.\n$", err).group(1).replace(",", ""))
    assert abs(fit - (10**9 - beside) // 264) <= 1  # the buffer's few bytes of counters aside
    assert main(["config", "check", "--set", "replay.capacity=3_000_000"]) == 0


def test_a_dispatch_whose_batches_cannot_fit_in_memory_is_one_line_exit_2_naming_the_key_that_sized_them(
    tmp_path, capsys, monkeypatch
):
    """Steps per dispatch (or the batch size, when one micro-batch alone is too large) set past
    memory would fail at the first stack the loop builds; the check refuses it first."""
    monkeypatch.setattr("continuity.factory.host_memory", lambda: 10**9)  # a machine said to have 1 GB
    row = 64 * 4 + 4 + 1  # 64 float32 features, an int32 label, a bool mask
    model = 1_700_044  # the default MLP's state (the replay test above)
    err = check_fails(tmp_path, capsys, "[learner]\nsteps_per_dispatch = 10_000_000\n")
    assert err.startswith(
        f"continuity: error: config {tmp_path / 'c.toml'}: [learner] steps_per_dispatch: a dispatch's "
        "10,000,000 micro-batches of 32 examples, two dispatches at once, take 167.0 GB, more than "
        "the 1.0 GB of this machine's memory holds beside the model's state (1.7 MB): "
    )
    assert err.endswith(f"at most ~{(10**9 - model) // (2 * 32 * row):,} fit. Got 10000000.\n")

    err = check_fails(tmp_path, capsys, "[learner]\nbatch_size = 100_000_000\n")
    assert err.startswith(
        f"continuity: error: config {tmp_path / 'c.toml'}: [learner] batch_size: a dispatch's 8 micro-batches "
        "of 100,000,000 examples, two dispatches at once, take 417.6 GB, more than "
    )
    assert err.endswith(f"at most ~{(10**9 - model) // (2 * 8 * row):,} fit. Got 100000000.\n")
    assert main(["config", "check", "--set", "learner.steps_per_dispatch=10_000"]) == 0  # 167 MB: fits


def test_a_model_whose_state_cannot_fit_in_memory_is_one_line_exit_2_naming_it_before_allocating(tmp_path, capsys):
    # 10**14 parameters: 400 TB each copy, more than any machine's memory or address space.
    err = check_fails(tmp_path, capsys, "[model]\nhidden = [10_000_000, 10_000_000]\n")
    assert err.startswith(
        f"continuity: error: config {tmp_path / 'c.toml'}: [model] hidden: the model's 100,000,760,000,010 "
        "parameters (the largest ['hidden'][1]['kernel']: float32[10000000, 10000000]) with their optimizer "
        "state and EWC's anchor and Fisher need 2,000.0 TB, more than the "
    )
    assert err.endswith("of this machine's memory. Got [10000000, 10000000].\n")

    # Named-field events: the preset's embedding table for a field is what its buckets size (640 GB).
    fields = (
        '[stream]\ncodec = "fields"\nnum_classes = 2\n'
        '[stream.fields]\nlabel = "clicked"\nlabel_classes = ["no", "yes"]\n'
        '[stream.fields.city]\nkind = "categorical"\nbuckets = 2_000_000_000\n'
    )
    err = check_fails(tmp_path, capsys, fields)
    assert err.startswith(
        f"continuity: error: config {tmp_path / 'c.toml'}: [stream.fields.city] buckets: the model's "
    )
    assert "(the largest ['embeddings']['city']['embedding']: float32[2000000000, 16])" in err
    assert err.endswith("Got 2000000000.\n")
