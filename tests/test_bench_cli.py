"""`continuity bench cl` and `bench step` end to end through the CLI, small."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from continuity.cli import main

pytestmark = pytest.mark.slow  # benchmarks end to end through the CLI


def test_bench_cl_runs_end_to_end_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "cl.json"
    status = main(
        [
            "bench",
            "cl",
            "--scenario",
            "permuted-digits",
            "--segments",
            "3",
            "--strategy",
            "ewc+replay",
            "--seed",
            "3",
            "--passes",
            "1",
            "--json",
            str(out),
        ]
    )
    assert status == 0
    result = json.loads(out.read_text())
    for key in (
        "scenario",
        "strategy",
        "seed",
        "passes",
        "accuracy_matrix",
        "avg_accuracy",
        "forgetting",
        "bwt",
        "examples_per_second",
        "wall_seconds",
    ):
        assert key in result
    matrix = np.array(result["accuracy_matrix"])
    assert matrix.shape == (3, 3)
    assert ((0 <= matrix) & (matrix <= 1)).all()
    assert result["avg_accuracy"] == pytest.approx(matrix[-1].mean())
    assert result["examples_per_second"] > 0
    # Each permutation is learned while it is the current segment (chance is 0.1).
    assert np.diag(matrix).min() > 0.7
    printed = capsys.readouterr().out
    assert "after perm-2" in printed and "avg accuracy" in printed


def test_bench_cl_joint_is_one_row_without_forgetting(tmp_path):
    out = tmp_path / "joint.json"
    assert (
        main(
            [
                "bench",
                "cl",
                "--scenario",
                "permuted-digits",
                "--segments",
                "2",
                "--strategy",
                "joint",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert len(result["accuracy_matrix"]) == 1 and len(result["accuracy_matrix"][0]) == 2
    assert result["forgetting"] is None and result["bwt"] is None


@pytest.mark.parametrize(
    "argument, value, valid",
    [
        ("--scenario", "imagenet", "'permuted-digits', 'rotated-digits', 'split-digits'"),
        ("--strategy", "magic", "'naive', 'ewc', 'replay', 'ewc+replay', 'joint'"),
    ],
)
def test_unknown_names_exit_2_with_one_line_listing_the_valid_ones(argument, value, valid):
    args = {"--scenario": "split-digits", "--strategy": "naive", argument: value}
    command = [sys.executable, "-m", "continuity.cli", "bench", "cl"] + [x for kv in args.items() for x in kv]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1
    assert value in lines[0] and valid in lines[0]


def test_bench_step_times_k_k1_and_the_plain_scanned_step_with_zero_compilations_after_warmup(tmp_path):
    out = tmp_path / "step.json"
    command = ["bench", "step", "--steps-per-dispatch", "4", "--steps", "16", "--repeats", "1", "--json", str(out)]
    assert main(command) == 0
    result = json.loads(out.read_text())
    assert result["steps_per_dispatch"] == 4 and result["updates_per_repeat"] == 16
    assert result["compilations_after_warmup"] == 0  # a partly filled final stack included
    for key in ("samples_per_second", "k1_samples_per_second", "plain_samples_per_second"):
        assert result[key] > 0
    assert result["ratio"] == pytest.approx(result["samples_per_second"] / result["plain_samples_per_second"])
    assert result["speedup_over_k1"] == pytest.approx(result["samples_per_second"] / result["k1_samples_per_second"])


def test_bench_scale_runs_each_device_count_and_replay_layout_in_its_own_process_and_as_two_processes(tmp_path, capsys):
    out = tmp_path / "scale.json"
    command = ["bench", "scale", "--devices", "1,2", "--processes", "1,2", "--replay", "replicated,sharded"]
    command += ["--steps-per-dispatch", "2", "--steps", "8", "--repeats", "1", "--check-dispatches", "4"]
    assert main([*command, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    one, two, sharded, two_processes = result["runs"]
    assert (one["devices"], two["devices"]) == (1, 2) and one["processes"] == two["processes"] == 1
    # 2 devices as 2 processes of one faked device each, over gloo: the same model as on one device.
    assert (two_processes["devices"], two_processes["processes"], two_processes["batch_size"]) == (2, 2, 64)
    assert two_processes["compilations_after_warmup"] == 0 and two_processes["faked_devices"]
    assert 0.0 <= two_processes["max_param_diff_vs_1_device"] < 1e-5
    assert (one["batch_size"], two["batch_size"]) == (32, 64)  # the per-device batch is fixed
    import jax

    faked = len(jax.local_devices()) < 2  # a machine with one device fakes two CPU devices for that case
    assert not one["faked_devices"] and two["faked_devices"] == faked
    for run in result["runs"]:
        assert run["examples_per_second"] == pytest.approx(run["batch_size"] / run["step_seconds"])
        assert run["compilations_after_warmup"] == 0
    assert one["max_param_diff_vs_1_device"] == 0.0
    assert 0.0 <= two["max_param_diff_vs_1_device"] < 1e-5  # the same model, up to float rounding
    assert two["per_example_cost_vs_1_device"] == pytest.approx((two["step_seconds"] / 64) / (one["step_seconds"] / 32))
    # The replay buffer sharded over the 2 devices: a case of its own, which replays other rows
    # (each device from its shard), so another model than one device's.
    assert (two["replay"], sharded["replay"], two_processes["replay"]) == ("replicated", "sharded", "replicated")
    assert sharded["devices"] == 2 and sharded["max_param_diff_vs_1_device"] > 1e-5
    table = capsys.readouterr().out
    assert ("  2 (1) faked" in table) == faked and "  2 (2) faked" in table and "sharded" in table


def test_bench_scale_refuses_an_unknown_replay_layout():
    with pytest.raises(SystemExit) as caught:
        main(["bench", "scale", "--replay", "split"])
    assert caught.value.code == 2


@pytest.mark.parametrize("devices", ["0,1", "1,1", "two"])
def test_bench_scale_refuses_device_counts_that_are_not_distinct_positive_integers(devices, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["bench", "scale", "--devices", devices])
    assert caught.value.code == 2
    assert "device counts like 1,2,4" in capsys.readouterr().err


def test_bench_pipeline_trains_everything_it_produced_at_the_default_k_and_at_k1():
    from continuity.benchmarks.pipeline import EXAMPLES_PER_RECORD, format_result, run_pipeline_benchmark

    result = run_pipeline_benchmark(
        examples=16 * EXAMPLES_PER_RECORD, warmup_examples=0, rss_from=0, compare_k1=True, idle_timeout_s=1.5
    )
    held_out = 0.1  # the default holdout share goes to the probe, not to training
    assert result["examples"] == pytest.approx(16 * EXAMPLES_PER_RECORD * (1 - held_out), rel=0.05)
    assert result["steps_per_dispatch"] == 8 and result["k1"]["examples"] == result["examples"]
    assert result["ingest_limit_examples_per_s"] > 0 and result["step_limit_examples_per_s"] > 0
    printed = format_result(result)
    assert "ratio to the lower limit" in printed and "at K = 1" in printed


def test_bench_pipelines_compute_limit_counts_trained_examples_as_the_pipeline_does(monkeypatch):
    """The compute limit is in the pipeline's unit: a batch's held-out rows take a slot in the
    step but are not trained, so they are not counted (a clock ticking 1 s per reading makes
    the rate the number counted)."""
    import itertools

    from continuity.benchmarks import pipeline
    from continuity.config import load_config

    config = load_config(None, ["learner.steps_per_dispatch=4", "probe.holdout_fraction=0.25"])
    ticks = itertools.count()
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: float(next(ticks)))
    counted = pipeline._step_rate(config, steps=8, repeats=1)  # two dispatches of 4 x 32 rows
    rows = 2 * 4 * config.learner.batch_size
    assert counted < rows and counted == pytest.approx(rows * 0.75, rel=0.2)


def test_bench_guard_runs_a_damaged_stream_four_ways_and_writes_the_figures_the_issue_names(tmp_path, capsys):
    out = tmp_path / "guard.json"
    arguments = ["bench", "guard", "--scenario", "permuted-digits", "--segments", "3", "--poison-kind", "constant"]
    assert main([*arguments, "--seed", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["clean_quarantined_share"] <= 1 and result["clean_guarded_vs_unguarded"] > 0
    assert result["guarded_vs_clean"] > 0 and result["unguarded_vs_clean"] > 0
    damage = result["damage"]
    assert (damage["kind"], damage["placement"], damage["at"], damage["source"]) == ("constant", "segment", 2, 0)
    assert 0 < damage["damaged_records"] < damage["records"] == result["records"]  # the last segment, replaced
    assert result["caught"]["windows"] is not None and "window.same_label" in result["caught"]["fired"]
    assert set(result["runs"]) == {"guarded", "unguarded"} and set(result["clean"]) == {"guarded", "unguarded"}
    assert "damage constant (segment at 2" in capsys.readouterr().out


def test_bench_guard_on_a_clean_stream_leaves_the_damage_figures_empty(tmp_path):
    out = tmp_path / "clean.json"
    assert main(["bench", "guard", "--scenario", "sea-abrupt", "--examples", "4000", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["damage"] is None and result["guarded_vs_clean"] is None and result["unguarded_vs_clean"] is None
    assert result["clean_quarantined_share"] == 0.0 and result["clean_guarded_vs_unguarded"] == 1.0


def test_make_bench_step_part_writes_its_json_and_a_table_of_the_figures_it_measured(tmp_path, monkeypatch):
    import functools

    from continuity.benchmarks import run, step

    small = functools.partial(step.run_step_benchmark, hidden=(16,), steps=16, repeats=1)
    monkeypatch.setattr(step, "run_step_benchmark", small)
    lines = run.run_step(tmp_path)
    result = json.loads((tmp_path / "step.json").read_text())
    row = lines[-2].split(" | ")
    assert lines[0].startswith("### bench step (batch 32, K = 8,")
    assert row[1] == f"{result['samples_per_second']:,.0f}" and row[3] == f"{result['ratio']:.2f}"


def test_bench_step_profile_traces_the_continual_step_and_prints_where_its_time_went(tmp_path, monkeypatch, capsys):
    import functools

    from continuity.benchmarks import step

    monkeypatch.setattr(step, "run_step_benchmark", functools.partial(step.run_step_benchmark, hidden=(16,)))
    out, traces = tmp_path / "step.json", tmp_path / "trace"
    command = ["bench", "step", "--steps", "16", "--repeats", "1", "--profile", str(traces), "--json", str(out)]
    assert main(command) == 0
    traced = json.loads(out.read_text())["profile"]
    assert traced["updates"] == 16 and Path(traced["trace"]).is_file() and traces in Path(traced["trace"]).parents
    assert "HloModule" in Path(traced["program"]).read_text()  # the compiled step the trace's names refer to
    top = traced["top"]
    assert top and all(op["us_per_update"] > 0 and not op["name"].startswith("$") for op in top)
    assert any(op["calls_per_update"] >= 1 for op in top)  # the step's own kernels, once or more per update
    printed = capsys.readouterr().out
    assert "where the continual step's time went (16 updates traced" in printed and top[0]["name"] in printed
    assert "device" not in traced and "on the device" not in printed  # the CPU's thunks run on host threads


def test_a_profiles_device_activity_counts_the_kernels_and_copies_on_device_rows_per_update():
    from continuity.benchmarks.step import device_activity

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
        *({"ph": "X", "pid": 1, "tid": 14, "name": f"fusion_{i}", "dur": 1.5} for i in range(6)),
        {"ph": "X", "pid": 1, "tid": 15, "name": "MemcpyH2D", "dur": 3.0},
        {"ph": "X", "pid": 7, "tid": 2, "name": "cuGraphLaunch", "dur": 50.0},  # the host's, not counted
    ]
    assert device_activity(events, updates=2) == {"kernels_per_update": 3.5, "busy_us_per_update": 6.0}
    assert device_activity([e for e in events if e["pid"] == 7], updates=2) is None


def test_bench_prequential_writes_its_figures_and_replay_of_the_same_records_reports_the_same(tmp_path, capsys):
    out, kept = tmp_path / "prequential.json", tmp_path / "kept"
    command = ["bench", "prequential", "--scenario", "agrawal", "--seed", "1", "--examples", "1500"]
    assert main([*command, "--set", "model.hidden=[32]", "--keep", str(kept), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["scenario"], result["seed"], result["examples"]) == ("agrawal", 1, 1500)
    assert 0.4 < result["prequential_accuracy"] < 1 and result["examples_per_second"] > 0
    assert list(result["concepts"]) == ["concept-1", "concept-2", "concept-3", "concept-4"]
    assert all(0 <= v <= 1 for v in result["concepts"].values())
    # Every trained record counted once; the probe's held-out records not at all.
    assert result["prequential_examples"] == result["examples_trained"] < 1500
    table = capsys.readouterr().out
    assert "whole stream" in table and f"{result['prequential_accuracy']:.4f}" in table
    assert len((kept / "events.jsonl").read_text().splitlines()) == 1500

    summary = tmp_path / "replay.json"
    replay = [
        "replay",
        str(kept / "stream.parquet"),
        "--config",
        str(kept / "config.toml"),
        "--out",
        str(tmp_path / "r"),
    ]
    assert main([*replay, "--set", "model.hidden=[32]", "--set", "service.seed=1", "--json", str(summary)]) == 0
    replayed = json.loads(summary.read_text())
    assert replayed["prequential_accuracy"] == result["prequential_accuracy"]
    assert replayed["prequential_examples"] == result["prequential_examples"]
    assert f"{result['prequential_accuracy']:.3f}" in capsys.readouterr().out.split("prequential accuracy")[1]


def test_bench_ingest_reads_every_case_to_the_end_interleaved_and_reports_the_issue_targets(broker):
    from continuity.benchmarks.ingest import format_result, run_ingest_benchmark

    progress: list[str] = []
    result = run_ingest_benchmark(
        records=300,
        batched_records=4,
        examples_per_record=16,
        repeats=2,
        bootstrap=broker.bootstrap,
        progress=progress.append,
    )
    cases = result["cases"]
    assert set(cases) == {
        "binary_single",
        "binary_batched",
        "binary_single_uint8",
        "binary_batched_uint8",
        "json",
        "json_thread",
        "fields_20",
        "fields_20_thread",
    }
    assert cases["json"]["decoder"] == "auto" and cases["json_thread"]["decoder"] == "thread"
    assert all(len(case["pipeline_seconds"]) == 2 and case["pipeline_examples_per_s"] > 0 for case in cases.values())
    # Every case's first repeat comes before any case's second.
    repeats = [line.split(": repeat ")[1][0] for line in progress if ": repeat " in line]
    assert repeats == ["1"] * len(cases) + ["2"] * len(cases)
    assert set(result["targets"]) >= {"json_single_vs_binary_single", "fields_20_examples_per_s"}
    assert "target json_single_vs_binary_single" in format_result(result)
