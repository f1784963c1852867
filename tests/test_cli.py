"""The ``cso`` command line: what a user sees (output, files, exit codes, one-line errors)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    assert_clean_failure,
    cso_executable,
    fail_training,
    files_under,
    make_record,
    make_records,
    write_json,
)
from typer.testing import Result

from calling_score_opt import cli
from calling_score_opt.data import FEATURE_NAMES, load_dataset
from calling_score_opt.errors import TrainingError
from calling_score_opt.export import contract_problems, read_metadata
from calling_score_opt.grid import RESULTS_FILENAME, onnx_filename
from calling_score_opt.space import VARIANTS

RunCli = Callable[..., Result]

# --- help ----------------------------------------------------------------------------------

LEAF_COMMANDS = [
    ("grid",),
    ("train",),
    ("data", "check"),
    ("data", "synth"),
    ("contract", "check"),
    ("contract", "vectors"),
]


@pytest.mark.parametrize("command", LEAF_COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(run_cli: RunCli, command: tuple[str, ...]) -> None:
    result = run_cli(*command, "--help")
    assert result.exit_code == 0, result.output
    assert f"Example: cso {' '.join(command)} " in result.stdout
    assert "--help" in result.stdout


@pytest.mark.parametrize(
    ("group", "listed"),
    [
        ((), ("grid", "train", "data", "contract")),
        (("data",), ("check", "synth")),
        (("contract",), ("check", "vectors")),
    ],
    ids=["cso", "cso data", "cso contract"],
)
def test_groups_have_help_listing_their_commands(
    run_cli: RunCli, group: tuple[str, ...], listed: tuple[str, ...]
) -> None:
    result = run_cli(*group, "--help")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    for name in listed:
        assert re.search(rf"^\W*{name}\s", result.stdout, re.MULTILINE), name


def test_options_are_documented(run_cli: RunCli) -> None:
    grid_help = run_cli("grid", "--help").stdout
    for option in (
        "--data-path",
        "--target",
        "--output-dir",
        "--max-variants",
        "--epochs",
        "--repeats",
        "--jobs",
        "--study",
        "--storage",
        "--artifacts",
        "--quiet",
    ):
        assert option in grid_help
    train_help = run_cli("train", "--help").stdout
    for option in (
        "--learning-rate",
        "--batch-size",
        "--hidden-sizes",
        "--dropout",
        "--output-path",
        "--seed",
        "--device",
    ):
        assert option in train_help


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\n"
        "from calling_score_opt import cli\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        "from typer.testing import CliRunner\n"
        "for args in (['--help'], ['grid', '--help'], ['train', '--help'],\n"
        "             ['data', 'check', '--help'], ['data', 'synth', '--help'],\n"
        "             ['contract', 'check', '--help'], ['contract', 'vectors', '--help']):\n"
        "    result = CliRunner().invoke(cli.app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'optuna', 'numpy')\n"
        "               if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('light')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "light"


def test_real_console_script_help() -> None:
    proc = subprocess.run(
        [cso_executable(), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage: cso" in proc.stdout


# --- cso data synth ------------------------------------------------------------------------


def test_data_synth_is_deterministic(run_cli: RunCli, tmp_path: Path) -> None:
    for name, seed in (("a.json", "3"), ("b.json", "3"), ("c.json", "4")):
        result = run_cli("data", "synth", "--records", "200", "--seed", seed, "--output", name)
        assert result.exit_code == 0, result.output
        assert f"Wrote 200 hybrid records to {name}" in result.stdout
    a, b, c = ((tmp_path / n).read_bytes() for n in ("a.json", "b.json", "c.json"))
    assert a == b
    assert a != c
    metadata = json.loads(a)["metadata"]
    assert 0 < metadata["irreducible_mse"] < metadata["label_variance"]
    printed = re.search(r"irreducible MSE ([\d.]+), label variance ([\d.]+)", result.stdout)
    assert printed is not None
    assert 0 < float(printed.group(1)) < float(printed.group(2))


def test_data_synth_default_output_is_the_default_data_file(
    run_cli: RunCli, tmp_path: Path
) -> None:
    result = run_cli("data", "synth", "--records", "30")
    assert result.exit_code == 0, result.output
    assert load_dataset(tmp_path / cli.DEFAULT_DATA).n_records == 30


def test_data_synth_refuses_zero_records(run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli("data", "synth", "--records", "0", "--output", "x.json")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.json").exists()


# --- cso data check ------------------------------------------------------------------------


def test_data_check_on_a_good_file(run_cli: RunCli, data_copy: Path) -> None:
    result = run_cli("data", "check", data_copy)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "200 records, 39 features" in out
    assert "200 from outcome_score" in out
    assert "Irreducible error recorded in metadata: MSE 0.0" in out
    assert "cso fills nothing with 0.5" in out
    assert "  spot_vibe_dimensions: spot_rating (200 records)\n" in out  # synth writes it
    assert "OK: this file can be trained on." in out
    assert result.stderr == ""


def test_data_check_shows_defaulted_and_constant_features(run_cli: RunCli, tmp_path: Path) -> None:
    records = make_records(30)
    renamed = {
        "vibe_compatibility": "context_feature_7",
        "energy_match": "context_feature_8",
        "community_match": "context_feature_9",
        "novelty_match": "context_feature_10",
    }
    for record in records:
        ctx = record["context_features"]
        for name, generator_name in renamed.items():
            ctx[generator_name] = ctx.pop(name)
        record["timing_features"]["timing_feature_5"] = record["timing_features"].pop(
            "timing_alignment"
        )
    del records[0]["user_vibe_dimensions"]["crowd_tolerance"]
    path = write_json(tmp_path / "generator.json", {"training_data": records})
    result = run_cli("data", "check", path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Inputs cso fills with 0.5 (the record lacks the key)" in out
    for name in renamed:
        assert re.search(rf"context_features\.{name}\s.*30 \(100%\)", out), name
    assert re.search(r"timing_features\.timing_alignment\s.*30 \(100%\)", out)
    assert re.search(r"user_vibe_dimensions\.crowd_tolerance\s.*1 \(3%\)", out)
    # the keys that took their place are named, per group, with their counts
    assert (
        "  context_features: context_feature_10 (30 records), context_feature_7 (30 records), "
        "context_feature_8 (30 records), context_feature_9 (30 records)\n"
    ) in out
    assert "  timing_features: timing_feature_5 (30 records)\n" in out
    assert "Constant inputs (5): a model never learns these inputs: its exported ONNX " in out
    constant = out.split("Constant inputs")[1]
    assert "so whatever the app sends there changes no score" in constant
    assert "context_features.novelty_match (always 0.5)" in constant
    assert "OK" in out


def test_data_check_csv_lists_ignored_columns(run_cli: RunCli, tmp_path: Path) -> None:
    rows = [f"u{i},{i / 30:.4f},{(i * 7 % 30) / 30:.4f},2026-01-01" for i in range(30)]
    path = tmp_path / "table.csv"
    path.write_text("user,a,score,date\n" + "\n".join(rows) + "\n", encoding="utf-8")
    result = run_cli("data", "check", path, "--target", "score")
    assert result.exit_code == 0, result.output
    assert "30 records, 1 features" in result.stdout
    assert "Ignored (non-numeric) columns: user, date" in result.stdout
    assert "30 from score" in result.stdout
    assert_clean_failure(run_cli("data", "check", path), "table.csv", "--target")


def test_data_check_refuses_an_untrainable_file(run_cli: RunCli, tmp_path: Path) -> None:
    records = [make_record(i, value=lambda i, c: (i + c) % 5 / 5, label=0.6) for i in range(25)]
    path = write_json(tmp_path / "flat.json", records)
    result = run_cli("data", "check", path)
    assert "25 records, 39 features" in result.stdout  # the report is still shown
    assert_clean_failure(result, "flat.json", "cannot be trained on", "every label is 0.6")


# --- bad input: exit 2, one line, the file and the record named, nothing written ------------


def _with(change: Callable[[list[dict[str, Any]]], Any]) -> str:
    records = make_records(25)
    change(records)
    return json.dumps({"training_data": records})


def _set_feature(group: str, name: str, value: Any) -> Callable[[list[dict[str, Any]]], Any]:
    return lambda rs: rs[4][group].__setitem__(name, value)


#: (id, file name, content or None for "no such file", fragments of the one-line error)
BAD_INPUTS: list[tuple[str, str, str | None, tuple[str, ...]]] = [
    ("missing-file", "missing.json", None, ("missing.json", "file not found")),
    ("not-json", "broken.json", '{"training_data": [1, 2', ("broken.json", "not valid JSON")),
    ("wrong-top-level", "shape.json", '"just a string"', ("shape.json", "top level is str")),
    ("no-training-data", "shape2.json", '{"data": []}', ("shape2.json", "'training_data'")),
    ("empty", "empty.json", '{"training_data": []}', ("empty.json", "contains no records")),
    (
        "record-not-object",
        "rec.json",
        json.dumps([*make_records(4), "oops", *make_records(20)]),
        ("rec.json", "record 4 is str, not an object"),
    ),
    (
        "non-numeric",
        "text.json",
        _with(_set_feature("context_features", "energy_match", "high")),
        ("text.json", "record 4", "context_features.energy_match", "is not a number"),
    ),
    (
        "nan",
        "nan.json",
        _with(_set_feature("timing_features", "user_patterns", float("nan"))),
        ("nan.json", "record 4", "timing_features.user_patterns", "not a finite number"),
    ),
    (
        "infinity",
        "inf.json",
        _with(_set_feature("spot_vibe_dimensions", "novelty_seeking", float("-inf"))),
        ("inf.json", "record 4", "spot_vibe_dimensions.novelty_seeking", "not a finite number"),
    ),
    (
        "bool",
        "bool.json",
        _with(_set_feature("user_vibe_dimensions", "crowd_tolerance", False)),
        ("bool.json", "record 4", "user_vibe_dimensions.crowd_tolerance", "False is not a number"),
    ),
    (
        "label-outside",
        "label.json",
        _with(lambda rs: rs[4].__setitem__("outcome_score", 1.01)),
        ("label.json", "record 4", "outcome_score", "outside [0, 1]"),
    ),
    (
        "missing-label",
        "nolabel.json",
        _with(lambda rs: (rs[4].pop("outcome_score"), rs[4].pop("formula_calling_score"))),
        ("nolabel.json", "record 4", "every record needs a label"),
    ),
    (
        "huge-integer",
        "huge.json",
        _with(_set_feature("context_features", "location_proximity", 10**400)),
        ("huge.json", "record 4", "context_features.location_proximity", "not a finite number"),
    ),
    (
        "integer-too-long-to-parse",
        "long.json",
        '{"training_data": [{"outcome_score": ' + "9" * 5000 + "}]}",
        ("long.json", "cannot be parsed as JSON"),
    ),
    (
        "markup-in-a-value",
        "markup.json",
        _with(_set_feature("timing_features", "user_patterns", "[/high]")),
        ("markup.json", "record 4", "'[/high]' is not a number"),
    ),
    (
        "too-few-records",
        "few.json",
        json.dumps(make_records(12)),
        ("few.json", "12 records", "at least 20"),
    ),
]


def _bad_file(tmp_path: Path, name: str, content: str | None) -> Path:
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "content", "fragments"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_data_check_bad_input_fails_cleanly(
    run_cli: RunCli, tmp_path: Path, name: str, content: str | None, fragments: tuple[str, ...]
) -> None:
    path = _bad_file(tmp_path, name, content)
    before = files_under(tmp_path)
    result = run_cli("data", "check", path)
    assert_clean_failure(result, *fragments)
    assert result.stdout == ""
    assert files_under(tmp_path) == before


@pytest.mark.parametrize(
    ("name", "content", "fragments"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_grid_bad_input_fails_cleanly_and_writes_nothing(
    run_cli: RunCli, tmp_path: Path, name: str, content: str | None, fragments: tuple[str, ...]
) -> None:
    path = _bad_file(tmp_path, name, content)
    before = files_under(tmp_path)
    result = run_cli(
        "grid", "--data-path", path, "--output-dir", "out", "--epochs", "1", "--jobs", "1"
    )
    assert_clean_failure(result, *fragments)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "studies").exists()
    assert files_under(tmp_path) == before  # no ONNX, no results, no study database


def test_train_bad_input_fails_cleanly_and_writes_nothing(run_cli: RunCli, tmp_path: Path) -> None:
    path = _bad_file(tmp_path, *BAD_INPUTS[7][1:3])  # NaN
    result = run_cli("train", "--data-path", path, "--epochs", "1", "--output-path", "m.onnx")
    assert_clean_failure(result, "nan.json", "record 4", "not a finite number")
    assert files_under(tmp_path) == [path]


@pytest.mark.parametrize(
    "command",
    [("data", "check", "bad.json"), ("grid", "--data-path", "bad.json", "--jobs", "1")],
    ids=["data-check", "grid"],
)
def test_real_console_script_fails_without_a_traceback(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    records = make_records(25)
    records[9]["outcome_score"] = float("nan")
    write_json(tmp_path / "bad.json", records)
    proc = subprocess.run(
        [cso_executable(), *command],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env={"PATH": str(Path(sys.executable).parent), "COLUMNS": "200", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: bad.json: record 9, field 'outcome_score'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


# --- cso train -----------------------------------------------------------------------------


def test_train_writes_a_verified_onnx_and_prints_its_losses(
    run_cli: RunCli, data_copy: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "train",
        "--data-path",
        data_copy,
        "--epochs",
        "3",
        "--output-path",
        "models/m.onnx",
        "--hidden-sizes",
        "64,32",
        "--learning-rate",
        "0.002",
        "--seed",
        "5",
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    test_loss = re.search(r"^Test Loss: (\d\.\d{5})$", out, re.MULTILINE)
    assert test_loss is not None, out
    assert re.search(r"^Val Loss: \d\.\d{5}$", out, re.MULTILINE)
    assert "Parameters: 4,673" in out  # 39*64+64 + 64*32+32 + 32+1
    assert "models/m.onnx" in out
    model = tmp_path / "models" / "m.onnx"
    assert contract_problems(model, n_features=39) == []
    assert sorted(p.name for p in model.parent.iterdir()) == ["m.onnx"]
    metadata = read_metadata(model)
    assert metadata["variant"] == "custom"
    hyper = json.loads(metadata["hyperparameters"])
    assert hyper["hidden_sizes"] == [64, 32]
    assert hyper["learning_rate"] == 0.002
    assert (hyper["epochs"], hyper["seed"]) == (3, 5)
    assert json.loads(metadata["feature_names"]) == list(FEATURE_NAMES)
    metrics = json.loads(metadata["metrics"])
    assert f"{metrics['test_loss']:.5f}" == test_loss.group(1)
    assert metadata["data_fingerprint"] == load_dataset(data_copy).fingerprint


def test_train_default_output_path(run_cli: RunCli, data_copy: Path, tmp_path: Path) -> None:
    result = run_cli("train", "--data-path", data_copy, "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert contract_problems(tmp_path / cli.DEFAULT_TRAIN_OUTPUT) == []


def test_train_without_data_generates_the_default_file(
    run_cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "DEFAULT_RECORDS", 200)  # the real default is 10,000
    result = run_cli("train", "--epochs", "1", "--output-path", "m.onnx")
    assert result.exit_code == 0, result.output
    assert f"No {cli.DEFAULT_DATA}: generating" in result.stdout
    assert load_dataset(tmp_path / cli.DEFAULT_DATA).n_records == 200
    assert (tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (("--hidden-sizes", "wide"), ("hidden sizes 'wide'", "positive integers")),
        (("--learning-rate", "0"), ("learning rate must be > 0",)),
        (("--device", "tpu"), ("--device must be cpu, cuda or auto",)),
    ],
    ids=["hidden-sizes", "learning-rate", "device"],
)
def test_train_bad_options_fail_cleanly(
    run_cli: RunCli,
    data_copy: Path,
    tmp_path: Path,
    options: tuple[str, ...],
    fragments: tuple[str, ...],
) -> None:
    result = run_cli(
        "train", "--data-path", data_copy, "--epochs", "1", "--output-path", "m.onnx", *options
    )
    assert_clean_failure(result, *fragments)
    assert not (tmp_path / "m.onnx").exists()


def test_train_divergence_fails_cleanly(run_cli: RunCli, data_copy: Path, tmp_path: Path) -> None:
    result = run_cli(
        "train",
        "--data-path",
        data_copy,
        "--epochs",
        "2",
        "--learning-rate",
        "1e30",
        "--output-path",
        "m.onnx",
    )
    assert_clean_failure(result, "non-finite", "lower learning rate")
    assert not (tmp_path / "m.onnx").exists()


# --- cso grid ------------------------------------------------------------------------------


def _grid(run_cli: RunCli, data: Path, *extra: str) -> Result:
    return run_cli(
        "grid",
        "--data-path",
        data,
        "--output-dir",
        "out",
        "--max-variants",
        "3",
        "--epochs",
        "2",
        "--jobs",
        "1",
        *extra,
    )


def test_grid_prints_the_best_variant_and_writes_results(
    run_cli: RunCli, data_copy: Path, tmp_path: Path
) -> None:
    result = _grid(run_cli, data_copy)
    assert result.exit_code == 0, result.output
    out = result.stdout
    results = json.loads((tmp_path / "out" / RESULTS_FILENAME).read_text(encoding="utf-8"))
    best = results["summary"]["best_variant"]
    assert best in {v.name for v in VARIANTS[:3]}
    assert f"BEST VARIANT: {best} (lowest validation loss)" in out
    best_entry = next(v for v in results["variants"] if v["name"] == best)
    assert f"Test Loss: {best_entry['test_loss']:.5f}" in out
    assert f"Val Loss: {best_entry['val_loss']:.5f}" in out
    assert "vs the baseline trained in this run" in out
    assert "95% paired-bootstrap interval" in out
    assert f"Parameters: {best_entry['parameters']:,}" in out
    assert "Top 3 variants by validation loss" in out
    assert "Noise floor: the data's irreducible error is" in out
    assert "Results: out/optimization_results.json (3 runs trained, 0 resumed" in out
    assert len(re.findall(r"^\[\d/3\] v1_", out, re.MULTILINE)) == 3  # one line per run
    for variant in VARIANTS[:3]:
        assert (tmp_path / "out" / onnx_filename(variant.name)).is_file()
    assert (tmp_path / "studies" / "calling-score-grid.db").is_file()
    assert result.stderr == ""

    again = _grid(run_cli, data_copy)
    assert again.exit_code == 0, again.output
    assert "Resuming: 3 of 3 runs are already in the study" in again.stdout
    assert "(0 runs trained, 3 resumed" in again.stdout
    assert f"BEST VARIANT: {best} " in again.stdout


def test_grid_quiet_prints_no_progress(run_cli: RunCli, data_copy: Path) -> None:
    result = _grid(run_cli, data_copy, "--quiet")
    assert result.exit_code == 0, result.output
    assert not re.search(r"^\[\d/3\]", result.stdout, re.MULTILINE)
    assert "BEST VARIANT" in result.stdout


def test_grid_repeats_report_the_mean(run_cli: RunCli, data_copy: Path, tmp_path: Path) -> None:
    result = run_cli(
        "grid",
        "--data-path",
        data_copy,
        "--output-dir",
        "out",
        "--max-variants",
        "2",
        "--epochs",
        "2",
        "--jobs",
        "1",
        "--repeats",
        "2",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "mean of 2 seeds" in result.stdout
    assert "±" in result.stdout
    assert "(4 runs trained, 0 resumed" in result.stdout


def test_grid_reports_failed_variants(
    run_cli: RunCli, data_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_training(
        monkeypatch,
        lambda config: config.learning_rate == 0.0001,
        TrainingError("loss became non-finite at epoch 1"),
    )
    result = _grid(run_cli, data_copy)
    assert result.exit_code == 0, result.output
    assert "v1_1_lr_0.0001: FAILED: loss became non-finite at epoch 1" in result.stdout
    assert "Failed variants (1):" in result.stdout
    assert "BEST VARIANT" in result.stdout


def test_grid_where_every_variant_fails_exits_2(
    run_cli: RunCli, data_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_training(monkeypatch, lambda config: True, TrainingError("diverged"))
    result = _grid(run_cli, data_copy, "--quiet")
    assert_clean_failure(result, "every variant failed")
    assert "Failed variants (3):" in result.stdout
    assert "BEST VARIANT" not in result.stdout
    assert list((tmp_path / "out").glob("*.onnx")) == []


def test_grid_on_other_data_with_the_same_study_fails_cleanly(
    run_cli: RunCli, data_copy: Path, synth_file_other: Path, tmp_path: Path
) -> None:
    assert _grid(run_cli, data_copy, "--quiet").exit_code == 0
    results = (tmp_path / "out" / RESULTS_FILENAME).read_bytes()
    result = _grid(run_cli, synth_file_other, "--quiet")
    assert_clean_failure(result, "study 'calling-score-grid'", "data_fingerprint", "--study")
    assert (tmp_path / "out" / RESULTS_FILENAME).read_bytes() == results


def test_grid_csv_with_target(run_cli: RunCli, tmp_path: Path) -> None:
    rows = [
        f"u{i},{i % 13 / 13:.4f},{i % 7 / 7:.4f},{(i % 13 / 13 + i % 7 / 7) / 2:.4f}"
        for i in range(60)
    ]
    (tmp_path / "t.csv").write_text("user,a,b,score\n" + "\n".join(rows) + "\n", "utf-8")
    result = run_cli(
        "grid",
        "--data-path",
        "t.csv",
        "--target",
        "score",
        "--output-dir",
        "out",
        "--max-variants",
        "1",
        "--epochs",
        "2",
        "--jobs",
        "1",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    model = tmp_path / "out" / onnx_filename("v1_0_baseline")
    assert contract_problems(model, n_features=2) == []
    assert json.loads(read_metadata(model)["feature_names"]) == ["a", "b"]
    assert "Parameters: 13,441" not in result.stdout  # 2 inputs, not 39
    assert "Parameters: 8,705" in result.stdout  # 2*128+128 + 128*64+64 + 64+1


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (("--study", "no spaces allowed"), ("study name 'no spaces allowed'",)),
        (("--storage", "nosuchdb://x/y"), ("--storage nosuchdb://x/y: cannot open",)),
        (("--device", "cuda-ish"), ("--device must be cpu, cuda or auto",)),
    ],
    ids=["study", "storage", "device"],
)
def test_grid_bad_options_fail_cleanly(
    run_cli: RunCli,
    data_copy: Path,
    tmp_path: Path,
    options: tuple[str, ...],
    fragments: tuple[str, ...],
) -> None:
    result = _grid(run_cli, data_copy, *options)
    assert_clean_failure(result, *fragments)
    assert list(tmp_path.rglob("*.onnx")) == []
    assert not (tmp_path / "out" / RESULTS_FILENAME).exists()


@pytest.mark.parametrize("value", ["0", "16"])
def test_grid_max_variants_out_of_range_is_a_usage_error(
    run_cli: RunCli, data_copy: Path, tmp_path: Path, value: str
) -> None:
    result = run_cli("grid", "--data-path", data_copy, "--max-variants", value, "--jobs", "1")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "--max-variants" in result.stderr
    assert not (tmp_path / "studies").exists()


# --- end to end on realistic data (deselected by default: pytest -m slow) -------------------


@pytest.mark.slow
def test_full_grid_end_to_end_with_worker_processes(tmp_path: Path) -> None:
    """The real console script: synth data, check it, run all 15 variants in 2 workers."""
    env = {"PATH": str(Path(sys.executable).parent), "COLUMNS": "200", "HOME": str(tmp_path)}

    def cso(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [cso_executable(), *args],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            cwd=tmp_path,
            env=env,
        )

    synth = cso("data", "synth", "--records", "3000", "--seed", "1", "--output", "d.json")
    assert synth.returncode == 0, synth.stderr
    check = cso("data", "check", "d.json")
    assert check.returncode == 0, check.stderr
    assert "3,000 records, 39 features" in check.stdout
    grid = cso("grid", "--data-path", "d.json", "--epochs", "30", "--jobs", "2", "--quiet")
    assert grid.returncode == 0, grid.stderr
    assert "Traceback" not in grid.stdout + grid.stderr
    assert "BEST VARIANT" in grid.stdout
    out = tmp_path / cli.DEFAULT_GRID_DIR
    assert len(list(out.glob("calling_score_model_*.onnx"))) == 15
    results = json.loads((out / RESULTS_FILENAME).read_text(encoding="utf-8"))
    summary = results["summary"]
    assert summary["succeeded"] == 15
    floor = summary["irreducible_mse"]
    best = next(v for v in results["variants"] if v["name"] == summary["best_variant"])
    label_variance = json.loads((tmp_path / "d.json").read_text())["metadata"]["label_variance"]
    # the models learn: far below predicting the mean, but not below the noise floor
    assert floor < best["test_loss"] < 0.6 * label_variance
    for entry in results["variants"]:
        assert contract_problems(Path(tmp_path / entry["onnx_path"]), n_features=39) == []


def test_a_path_that_looks_like_markup_is_printed_as_is(run_cli: RunCli, tmp_path: Path) -> None:
    path = tmp_path / "old[red]" / "x[/]y.json"
    result = run_cli("data", "check", path)
    assert_clean_failure(result, "old[red]/x[/]y.json", "file not found")


# --- help of the study commands ------------------------------------------------------------

STUDY_COMMANDS = ["search", "trials", "best", "export"]


@pytest.mark.parametrize("command", STUDY_COMMANDS)
def test_study_commands_have_help_with_an_example(run_cli: RunCli, command: str) -> None:
    result = run_cli(command, "--help")
    assert result.exit_code == 0, result.output
    assert f"Example: cso {command} " in result.stdout
    assert re.search(rf"^\W*{command}\s", run_cli("--help").stdout, re.MULTILINE)


def test_study_command_options_are_documented(run_cli: RunCli) -> None:
    documented = {
        "search": (
            "--trials",
            "--space",
            "--sampler",
            "--pruner",
            "--objectives",
            "--pair-features",
            "--timeout",
            "--data-path",
            "--epochs",
            "--seed",
            "--jobs",
            "--study",
            "--storage",
            "--artifacts",
        ),
        "trials": ("--study", "--storage", "--limit"),
        "best": ("--study", "--storage"),
        "export": ("--trial", "--best", "--top", "--output-dir", "--study", "--artifacts"),
    }
    for command, options in documented.items():
        text = run_cli(command, "--help").stdout
        for option in options:
            assert option in text, (command, option)


def test_study_command_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\n"
        "from calling_score_opt import cli\n"
        "from typer.testing import CliRunner\n"
        "for name in ('search', 'trials', 'best', 'export'):\n"
        "    result = CliRunner().invoke(cli.app, [name, '--help'])\n"
        "    assert result.exit_code == 0, result.output\n"
        "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'optuna', 'numpy')\n"
        "               if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('light')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "light"


def test_real_console_script_search_fails_without_a_traceback(tmp_path: Path) -> None:
    records = make_records(25)
    write_json(tmp_path / "d.json", records)
    proc = subprocess.run(
        [cso_executable(), "search", "--data-path", "d.json", "--sampler", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env={"PATH": str(Path(sys.executable).parent), "COLUMNS": "200", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: --sampler must be one of tpe, gp, cmaes, random, got 'nope'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


def _all_commands() -> list[tuple[str, ...]]:
    import typer

    from calling_score_opt.cli import app

    def walk(command: Any, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        subcommands = getattr(command, "commands", None)  # a group
        if subcommands:
            return [p for name, sub in subcommands.items() for p in walk(sub, (*path, name))]
        return [path]

    return walk(typer.main.get_command(app), ())


ALL_COMMANDS = _all_commands()


def test_the_walk_finds_every_command() -> None:
    names = {" ".join(c) for c in ALL_COMMANDS}
    assert {
        "grid",
        "train",
        "search",
        "trials",
        "best",
        "export",
        "report",
        "dashboard",
        "data check",
        "data synth",
        "contract check",
        "contract vectors",
        "registry register",
        "registry route",
    } <= names


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=" ".join)
def test_every_cli_command_has_help_an_example_and_docs(
    run_cli: RunCli, command: tuple[str, ...]
) -> None:
    result = run_cli(*command, "--help")
    assert result.exit_code == 0, result.output
    assert f"Example: cso {' '.join(command)}" in result.stdout
    root = Path(__file__).resolve().parent.parent
    docs = (root / "README.md").read_text() + "".join(
        p.read_text() for p in sorted((root / "docs").glob("*.md"))
    )
    assert f"cso {' '.join(command)}" in docs, f"cso {' '.join(command)} is not in README or docs/"


def test_a_refused_grid_prints_nothing_on_stdout(run_cli: RunCli, data_copy: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is not refused here")
    result = run_cli("grid", "--data-path", data_copy, "--device", "cuda", "--jobs", "1")
    assert_clean_failure(result, "--device cuda")
    assert result.stdout == ""


def test_version(run_cli: RunCli) -> None:
    from calling_score_opt import __version__

    result = run_cli("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"cso {__version__}"


def test_ci_runs_the_readme_test_command_and_it_installs_the_cpu_wheel() -> None:
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8").splitlines()
    (command,) = [
        line for line in readme if line.startswith("python3 -m venv") and "pytest" in line
    ]
    assert command in (root / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    # PyTorch's CPU index: on Linux, PyPI's torch wheel pulls gigabytes of CUDA libraries
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in command
    (run,) = [line for line in readme if line.startswith("python3 -m venv") and "cso grid" in line]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in run


def test_no_doc_points_outside_the_repository() -> None:
    root = Path(__file__).resolve().parent.parent
    texts = [
        root / "README.md",
        *(root / "docs").glob("*.md"),
        *(root / "calling_score_opt").rglob("*.py"),
    ]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text, path
        assert "CONTRACTS" not in text, path


def test_learning_rate_help_says_what_is_accepted(run_cli: RunCli) -> None:
    """Its help once said x>=0.0 while 0 is refused: it must not promise what it refuses."""
    result = run_cli("train", "--help")
    assert result.exit_code == 0
    line = next(x for x in result.stdout.splitlines() if "--learning-rate" in x)
    assert "x>=0.0" not in line
    assert "positive" in result.stdout
    refused = run_cli("train", "--learning-rate", "0", "--epochs", "1")
    assert_clean_failure(refused, "learning rate must be > 0")
