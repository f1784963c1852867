"""Loading, checking and splitting training data (docs/contract.md)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import assert_clean_failure, make_record, make_records, write_json
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import Result

from calling_score_opt.data import (
    FEATURE_GROUPS,
    FEATURE_NAMES,
    MAX_FEATURE_SPREAD,
    MIN_LABEL_STD,
    MIN_RECORDS,
    N_FEATURES,
    Dataset,
    Scaling,
    check_dataset,
    load_dataset,
    require_trainable,
    split_dataset,
)
from calling_score_opt.errors import CsoError, DataError
from calling_score_opt.stacked import train_one
from calling_score_opt.train import TrainConfig, train_model

RunCli = Callable[..., Result]

VIBE = [
    "exploration_eagerness",
    "community_orientation",
    "authenticity_preference",
    "social_discovery_style",
    "temporal_flexibility",
    "location_adventurousness",
    "curation_tendency",
    "trust_network_reliance",
    "energy_preference",
    "novelty_seeking",
    "value_orientation",
    "crowd_tolerance",
]
CONTEXT = [
    "location_proximity",
    "journey_alignment",
    "user_receptivity",
    "opportunity_availability",
    "network_effects",
    "community_patterns",
    "vibe_compatibility",
    "energy_match",
    "community_match",
    "novelty_match",
]
TIMING = [
    "optimal_time_of_day",
    "optimal_day_of_week",
    "user_patterns",
    "opportunity_timing",
    "timing_alignment",
]
#: docs/contract.md, written out independently of the package.
DOCUMENTED_ORDER = (
    [f"user_vibe_dimensions.{n}" for n in VIBE]
    + [f"spot_vibe_dimensions.{n}" for n in VIBE]
    + [f"context_features.{n}" for n in CONTEXT]
    + [f"timing_features.{n}" for n in TIMING]
)


def by_column(i: int, c: int) -> float:
    """A value that tells which record and column it came from."""
    return round(i + (c + 1) / 100, 4)


# --- the documented feature order ----------------------------------------------------------


def test_feature_names_are_the_39_documented_inputs_in_order() -> None:
    assert len(DOCUMENTED_ORDER) == 39
    assert list(FEATURE_NAMES) == DOCUMENTED_ORDER
    assert N_FEATURES == 39


def test_each_value_lands_in_its_documented_column(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", {"training_data": make_records(25, value=by_column)})
    dataset = load_dataset(path)
    assert dataset.features.shape == (25, 39)
    assert dataset.features.dtype == np.float32
    expected = np.array([[by_column(i, c) for c in range(39)] for i in range(25)], np.float32)
    np.testing.assert_array_equal(dataset.features, expected)
    # two spot checks against the contract table
    assert FEATURE_NAMES[23] == "spot_vibe_dimensions.crowd_tolerance"
    assert dataset.features[4, 23] == pytest.approx(4.24)
    assert FEATURE_NAMES[38] == "timing_features.timing_alignment"
    assert dataset.features[4, 38] == pytest.approx(4.39)
    assert FEATURE_NAMES[12] == "spot_vibe_dimensions.exploration_eagerness"
    assert dataset.features[0, 12] == pytest.approx(0.13)


def test_key_order_inside_a_group_does_not_matter(tmp_path: Path) -> None:
    records = make_records(25, value=by_column)
    for record in records:
        record["timing_features"] = dict(reversed(list(record["timing_features"].items())))
    dataset = load_dataset(write_json(tmp_path / "d.json", records))
    assert dataset.features[3, 34] == pytest.approx(3.35)  # optimal_time_of_day
    assert dataset.features[3, 38] == pytest.approx(3.39)  # timing_alignment


# --- the three accepted layouts ------------------------------------------------------------


def test_loads_export_with_metadata(tmp_path: Path) -> None:
    document = {
        "metadata": {"num_samples": 25, "source": "hybrid_big_five", "irreducible_mse": 0.004},
        "training_data": make_records(25),
    }
    dataset = load_dataset(write_json(tmp_path / "d.json", document))
    assert dataset.n_records == 25
    assert dataset.metadata["source"] == "hybrid_big_five"
    assert dataset.irreducible_mse == pytest.approx(0.004)


def test_loads_export_without_metadata(tmp_path: Path) -> None:
    dataset = load_dataset(write_json(tmp_path / "d.json", {"training_data": make_records(25)}))
    assert dataset.n_records == 25
    assert dict(dataset.metadata) == {}
    assert dataset.irreducible_mse is None


def test_loads_bare_list_of_records(tmp_path: Path) -> None:
    records = make_records(25, value=by_column)
    bare = load_dataset(write_json(tmp_path / "bare.json", records))
    wrapped = load_dataset(write_json(tmp_path / "wrapped.json", {"training_data": records}))
    assert bare.n_records == 25
    np.testing.assert_array_equal(bare.features, wrapped.features)
    np.testing.assert_array_equal(bare.labels, wrapped.labels)


def test_fingerprint_is_sha256_of_the_file_bytes(synth_file: Path) -> None:
    dataset = load_dataset(synth_file)
    assert dataset.fingerprint == "sha256:" + hashlib.sha256(synth_file.read_bytes()).hexdigest()


# --- labels --------------------------------------------------------------------------------


def test_label_is_outcome_score_else_formula_score(tmp_path: Path) -> None:
    records = make_records(24)
    records[0]["outcome_score"], records[0]["formula_calling_score"] = 0.9, 0.1
    del records[1]["outcome_score"]
    records[1]["formula_calling_score"] = 0.25
    records[2]["outcome_score"] = None  # null counts as absent
    records[2]["formula_calling_score"] = 0.75
    dataset = load_dataset(write_json(tmp_path / "d.json", records))
    assert dataset.labels[0] == pytest.approx(0.9)
    assert dataset.labels[1] == pytest.approx(0.25)
    assert dataset.labels[2] == pytest.approx(0.75)
    assert dict(dataset.label_sources) == {"outcome_score": 22, "formula_calling_score": 2}


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_labels_at_the_bounds_are_accepted(tmp_path: Path, label: float) -> None:
    records = make_records(25)
    records[3]["outcome_score"] = label
    assert load_dataset(write_json(tmp_path / "d.json", records)).labels[3] == label


# --- missing and extra keys ----------------------------------------------------------------


def test_missing_key_is_0_5_and_counted_as_defaulted(tmp_path: Path) -> None:
    records = make_records(30, value=lambda i, c: 0.9)
    for record in records[:12]:
        # what the existing generators do: numbered names instead of the documented ones
        record["context_features"]["context_feature_7"] = record["context_features"].pop(
            "vibe_compatibility"
        )
        del record["timing_features"]["timing_alignment"]
    del records[20]["user_vibe_dimensions"]  # a whole group missing
    records[21]["spot_vibe_dimensions"] = None  # null group: missing too
    dataset = load_dataset(write_json(tmp_path / "d.json", records))

    vibe_compat = FEATURE_NAMES.index("context_features.vibe_compatibility")
    timing_alignment = FEATURE_NAMES.index("timing_features.timing_alignment")
    assert (vibe_compat, timing_alignment) == (30, 38)
    assert np.all(dataset.features[:12, 30] == 0.5)
    assert np.all(dataset.features[12:, 30] == pytest.approx(0.9))
    assert np.all(dataset.features[:12, 38] == 0.5)
    assert np.all(dataset.features[20, :12] == 0.5)
    assert np.all(dataset.features[21, 12:24] == 0.5)
    assert dataset.n_features == 39  # the extra context_feature_7 key is not a feature

    expected = np.zeros(39, dtype=np.int64)
    expected[30] = expected[38] = 12
    expected[:12] = 1
    expected[12:24] = 1
    assert dataset.defaulted is not None
    np.testing.assert_array_equal(dataset.defaulted, expected)

    report = check_dataset(dataset)
    assert report.defaulted["context_features.vibe_compatibility"] == 12
    assert report.defaulted["timing_features.timing_alignment"] == 12
    assert report.defaulted["user_vibe_dimensions.crowd_tolerance"] == 1
    assert "context_features.energy_match" not in report.defaulted


def test_constant_defaulted_feature_is_reported_constant(tmp_path: Path) -> None:
    records = make_records(30)
    for record in records:
        del record["context_features"]["novelty_match"]
    report = check_dataset(load_dataset(write_json(tmp_path / "d.json", records)))
    assert report.constant_features == ("context_features.novelty_match",)
    assert report.constant_values == {"context_features.novelty_match": 0.5}
    assert report.defaulted == {"context_features.novelty_match": 30}
    assert report.problems == ()  # constant inputs are reported, not fatal


def test_extra_keys_are_ignored(tmp_path: Path) -> None:
    plain = make_records(25, value=by_column)
    extra = make_records(25, value=by_column)
    for record in extra:
        record["spot_vibe_dimensions"]["spot_rating"] = "four stars"  # not even a number
        record["context_features"]["distance_km"] = 12.5
        record["is_called"] = True
        record["outcome_type"] = "positive"
        record["timestamp"] = "2026-01-01T00:00:00Z"
        record["something_new"] = {"nested": [1, 2]}
    a = load_dataset(write_json(tmp_path / "plain.json", plain))
    b = load_dataset(write_json(tmp_path / "extra.json", extra))
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert b.defaulted is not None and int(b.defaulted.sum()) == 0


def test_keys_that_are_not_inputs_are_counted_per_group(tmp_path: Path) -> None:
    records = make_records(30, value=by_column)
    for i, record in enumerate(records):
        if i % 3 == 0:
            record["user_vibe_dimensions"]["overall_energy"] = 0.6
        record["user_vibe_dimensions"]["social_preference"] = 0.4
        record["spot_vibe_dimensions"]["spot_rating"] = "four stars"
    context = records[5]["context_features"]
    context["context_feature_7"] = context.pop("vibe_compatibility")
    records[6]["timing_features"] = None
    records[7]["note"] = "a top-level key: not in a group, not counted"
    dataset = load_dataset(write_json(tmp_path / "d.json", records))
    assert dataset.ignored_keys == {
        "user_vibe_dimensions": {"overall_energy": 10, "social_preference": 30},
        "spot_vibe_dimensions": {"spot_rating": 30},
        "context_features": {"context_feature_7": 1},
    }
    report = check_dataset(dataset)
    assert list(report.ignored_keys) == [  # in the model's group order, most held first
        "user_vibe_dimensions",
        "spot_vibe_dimensions",
        "context_features",
    ]
    assert list(report.ignored_keys["user_vibe_dimensions"].items()) == [
        ("social_preference", 30),
        ("overall_energy", 10),
    ]
    # the extra keys change nothing else
    plain = load_dataset(write_json(tmp_path / "plain.json", make_records(30, value=by_column)))
    np.testing.assert_array_equal(dataset.features[:5], plain.features[:5])
    assert plain.ignored_keys == {}


def test_data_check_names_ignored_keys_per_group(run_cli: RunCli, tmp_path: Path) -> None:
    records = make_records(30)
    for record in records:
        record["user_vibe_dimensions"]["social_preference"] = 0.4
        record["user_vibe_dimensions"]["overall_energy"] = 0.6
    records[0]["user_vibe_dimensions"]["bad\nkey"] = 1
    result = run_cli("data", "check", write_json(tmp_path / "d.json", records))
    assert result.exit_code == 0, result.output
    assert (
        "Keys cso ignores (not model inputs), by group:\n  user_vibe_dimensions: overall_energy "
        "(30 records), social_preference (30 records), bad\\nkey (1 record)\n"
    ) in result.stdout


def test_synthetic_file_has_nothing_defaulted(tiny_dataset: Dataset) -> None:
    assert tiny_dataset.defaulted is not None
    assert int(tiny_dataset.defaulted.sum()) == 0
    assert tiny_dataset.n_records == 200
    assert dict(tiny_dataset.label_sources) == {"outcome_score": 200, "formula_calling_score": 0}


# --- bad input: one DataError naming the file, the record and the field --------------------


def _records_with(change: Any) -> list[dict[str, Any]]:
    records = make_records(25)
    change(records)
    return records


def _set(path: tuple[str, ...], value: Any, index: int = 3) -> Any:
    def change(records: list[dict[str, Any]]) -> None:
        target = records[index]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


#: (id, file text, fragments the message must contain)
BAD_JSON: list[tuple[str, str, tuple[str, ...]]] = [
    ("not-json", '{"training_data": [', ("not valid JSON", "line 1")),
    ("empty-file", "", ("not valid JSON",)),
    ("top-level-string", '"hello"', ("top level is str",)),
    ("top-level-number", "42", ("top level is int",)),
    ("object-without-training-data", '{"records": []}', ("no 'training_data' list",)),
    ("training-data-not-a-list", '{"training_data": {"a": 1}}', ("'training_data' is dict",)),
    ("empty-list", "[]", ("contains no records",)),
    ("empty-training-data", '{"metadata": {}, "training_data": []}', ("contains no records",)),
    (
        "record-not-an-object",
        json.dumps([*make_records(3), [0.1, 0.2], *make_records(20)]),
        ("record 3 is list, not an object",),
    ),
    (
        "group-not-an-object",
        json.dumps(_records_with(_set(("context_features",), [0.5] * 10))),
        ("record 3", "'context_features'", "not an object"),
    ),
    (
        "non-numeric-value",
        json.dumps(_records_with(_set(("spot_vibe_dimensions", "crowd_tolerance"), "high"))),
        ("record 3", "'spot_vibe_dimensions.crowd_tolerance'", "'high' is not a number"),
    ),
    (
        "null-value",
        json.dumps(_records_with(_set(("timing_features", "user_patterns"), None))),
        ("record 3", "'timing_features.user_patterns'", "None is not a number"),
    ),
    (
        "bool-value",
        json.dumps(_records_with(_set(("user_vibe_dimensions", "novelty_seeking"), True))),
        ("record 3", "'user_vibe_dimensions.novelty_seeking'", "True is not a number"),
    ),
    (
        "nan-literal",
        json.dumps(_records_with(_set(("context_features", "energy_match"), float("nan")))),
        ("record 3", "'context_features.energy_match'", "not a finite number"),
    ),
    (
        "infinity-literal",
        json.dumps(_records_with(_set(("context_features", "energy_match"), float("inf")))),
        ("record 3", "'context_features.energy_match'", "not a finite number"),
    ),
    (
        "nan-label",
        json.dumps(_records_with(_set(("outcome_score",), float("nan")))),
        ("record 3", "'outcome_score'", "not a finite number"),
    ),
    (
        "bool-label",
        json.dumps(_records_with(_set(("outcome_score",), False))),
        ("record 3", "'outcome_score'", "False is not a number"),
    ),
    (
        "label-above-1",
        json.dumps(_records_with(_set(("outcome_score",), 1.5))),
        ("record 3", "'outcome_score'", "1.5 is outside [0, 1]"),
    ),
    (
        "label-below-0",
        json.dumps(_records_with(_set(("outcome_score",), -0.01))),
        ("record 3", "'outcome_score'", "outside [0, 1]"),
    ),
    (
        "formula-label-outside",
        json.dumps(
            _records_with(
                lambda rs: (rs[3].pop("outcome_score"), rs[3].update(formula_calling_score=2))
            )
        ),
        ("record 3", "'formula_calling_score'", "outside [0, 1]"),
    ),
    (
        "missing-label",
        json.dumps(
            _records_with(
                lambda rs: (rs[3].pop("outcome_score"), rs[3].pop("formula_calling_score"))
            )
        ),
        ("record 3", "'outcome_score'", "missing", "formula_calling_score"),
    ),
    (
        "too-few-records",
        json.dumps({"training_data": make_records(MIN_RECORDS - 1)}),
        ("19 records", "at least 20"),
    ),
]


def test_nan_and_infinity_cases_really_use_the_json_literals() -> None:
    texts = {case_id: text for case_id, text, _ in BAD_JSON}
    assert "NaN" in texts["nan-literal"]
    assert "Infinity" in texts["infinity-literal"]


@pytest.mark.parametrize(
    ("text", "fragments"), [c[1:] for c in BAD_JSON], ids=[c[0] for c in BAD_JSON]
)
def test_bad_json_raises_data_error_naming_file_record_and_field(
    tmp_path: Path, text: str, fragments: tuple[str, ...]
) -> None:
    path = tmp_path / "export.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_dataset(path)
    message = str(excinfo.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    assert excinfo.value.exit_code == 2


def test_exactly_min_records_is_enough(tmp_path: Path) -> None:
    dataset = load_dataset(write_json(tmp_path / "d.json", make_records(MIN_RECORDS)))
    assert dataset.n_records == 20


def test_missing_file_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.json: file not found"):
        load_dataset(tmp_path / "nope.json")


def test_folder_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a folder"):
        load_dataset(tmp_path)


def test_binary_file_raises_data_error(tmp_path: Path) -> None:
    path = tmp_path / "blob.json"
    path.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(DataError, match=r"blob\.json"):
        load_dataset(path)


def test_first_bad_record_is_the_one_named(tmp_path: Path) -> None:
    records = make_records(30)
    records[17]["user_vibe_dimensions"]["energy_preference"] = "x"
    records[25]["user_vibe_dimensions"]["energy_preference"] = "y"
    with pytest.raises(DataError, match=r"record 17, field 'user_vibe_dimensions\.energy_pref"):
        load_dataset(write_json(tmp_path / "d.json", records))


def test_data_error_is_a_cso_error() -> None:
    assert issubclass(DataError, CsoError)


def test_untrainable_file_is_refused(tmp_path: Path) -> None:
    records = [make_record(i, label=0.7) for i in range(25)]  # every label the same
    dataset = load_dataset(write_json(tmp_path / "flat.json", records))
    report = check_dataset(dataset)
    assert report.label_std == 0.0
    assert any("every label is 0.7" in p for p in report.problems)
    assert any("every feature is constant" in p for p in report.problems)
    with pytest.raises(DataError, match=r"flat\.json: cannot be trained on: every label"):
        require_trainable(dataset)


def test_check_reports_values_outside_0_1(tmp_path: Path) -> None:
    records = make_records(25)
    records[2]["context_features"]["location_proximity"] = 3.0
    records[5]["context_features"]["location_proximity"] = -1.0
    report = check_dataset(load_dataset(write_json(tmp_path / "d.json", records)))
    assert report.out_of_range == {"context_features.location_proximity": 2}
    assert report.problems == ()


def test_check_label_summary(tmp_path: Path) -> None:
    records = [make_record(i, value=by_column, label=i / 20) for i in range(21)]
    report = check_dataset(load_dataset(write_json(tmp_path / "d.json", records)))
    assert report.label_mean == pytest.approx(0.5)
    assert report.label_quantiles["min"] == 0.0
    assert report.label_quantiles["median"] == pytest.approx(0.5)
    assert report.label_quantiles["max"] == 1.0


def test_target_option_is_refused_for_json(synth_file: Path) -> None:
    with pytest.raises(DataError, match="--target applies to CSV files only"):
        load_dataset(synth_file, target="outcome_score")


# --- CSV -----------------------------------------------------------------------------------


def _csv(tmp_path: Path, header: str, rows: list[str], name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _csv_rows(n: int = 25) -> list[str]:
    return [
        f"u{i},{i / 100},{(i % 7) / 7:.4f},{(i % 10) / 10},2026-01-{i % 28 + 1:02d},{i}"
        for i in range(n)
    ]


def test_csv_with_target_numeric_columns_are_features(tmp_path: Path) -> None:
    path = _csv(tmp_path, "user,a,b,score,date,n", _csv_rows())
    dataset = load_dataset(path, target="score")
    assert dataset.feature_names == ("a", "b", "n")
    assert dataset.ignored_columns == ("user", "date")
    assert dataset.features.shape == (25, 3)
    assert dataset.features[7].tolist() == pytest.approx([0.07, 0.0, 7.0])
    assert dataset.labels[7] == pytest.approx(0.7)
    assert dict(dataset.label_sources) == {"score": 25}
    assert dataset.defaulted is not None and int(dataset.defaulted.sum()) == 0


def test_csv_with_bom_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("\ufeffa,score\n" + "\n".join(f"{i},{i / 40}\n" for i in range(25)), "utf-8")
    dataset = load_dataset(path, target="score")
    assert dataset.feature_names == ("a",)
    assert dataset.n_records == 25


def test_csv_without_target_is_refused(tmp_path: Path) -> None:
    path = _csv(tmp_path, "user,a,b,score,date,n", _csv_rows())
    with pytest.raises(DataError, match="needs --target COLUMN"):
        load_dataset(path)


def test_csv_unknown_target_lists_columns(tmp_path: Path) -> None:
    path = _csv(tmp_path, "user,a,b,score,date,n", _csv_rows())
    with pytest.raises(DataError, match=r"no column 'label'.*user, a, b, score, date, n"):
        load_dataset(path, target="label")


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ("u3,0.1,0.2,oops,2026-01-01,3", ("record 3", "'score'", "'oops' is not a number")),
        ("u3,0.1,0.2,1.2,2026-01-01,3", ("record 3", "'score'", "outside [0, 1]")),
        ("u3,nan,0.2,0.5,2026-01-01,3", ("record 3", "'a'", "not a finite number")),
        ("u3,0.1,inf,0.5,2026-01-01,3", ("record 3", "'b'", "not a finite number")),
        ("u3,0.1,0.2,0.5", ("record 3 (line 5)", "has 4 cells", "header has 6")),
    ],
    ids=["text-label", "label-outside", "nan-feature", "inf-feature", "ragged-row"],
)
def test_bad_csv_row_names_record_and_field(
    tmp_path: Path, row: str, fragments: tuple[str, ...]
) -> None:
    rows = _csv_rows()
    rows[3] = row
    path = _csv(tmp_path, "user,a,b,score,date,n", rows)
    with pytest.raises(DataError) as excinfo:
        load_dataset(path, target="score")
    message = str(excinfo.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty CSV"),
        ("a,score\n", "no rows"),
        ("user,score\n" + "\n".join(f"u{i},0.5" for i in range(25)), "no numeric column"),
        ("a,score\n" + "\n".join(f"{i},0.5" for i in range(5)), "5 records"),
    ],
    ids=["empty", "header-only", "no-features", "too-few"],
)
def test_unusable_csv_is_refused(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=fragment):
        load_dataset(path, target="score")


# --- splitting and scaling -----------------------------------------------------------------


def _indexed_dataset(tmp_path: Path, n: int = 200) -> Dataset:
    """Column 0 holds the record index, so every split row says where it came from."""
    return load_dataset(
        write_json(
            tmp_path / "idx.json",
            make_records(n, value=lambda i, c: float(i) if c == 0 else (i * c % 13) / 13),
        )
    )


def _ids(x: np.ndarray) -> list[int]:
    return [int(v) for v in x[:, 0]]


def test_split_is_70_15_15_disjoint_and_complete(tmp_path: Path) -> None:
    split = split_dataset(_indexed_dataset(tmp_path), seed=0)
    assert split.sizes == {"train": 140, "val": 30, "test": 30}
    train, val, test = _ids(split.x_train), _ids(split.x_val), _ids(split.x_test)
    assert set(train).isdisjoint(val)
    assert set(train).isdisjoint(test)
    assert set(val).isdisjoint(test)
    assert sorted(train + val + test) == list(range(200))
    # labels travel with their rows
    dataset = _indexed_dataset(tmp_path)
    np.testing.assert_array_equal(split.y_test, dataset.labels[test])


def test_split_of_the_minimum_leaves_three_to_validate_and_test(tmp_path: Path) -> None:
    split = split_dataset(_indexed_dataset(tmp_path, MIN_RECORDS), seed=3)
    assert split.sizes == {"train": 14, "val": 3, "test": 3}


def test_split_is_deterministic_by_seed(tmp_path: Path) -> None:
    dataset = _indexed_dataset(tmp_path)
    a, b = split_dataset(dataset, seed=42), split_dataset(dataset, seed=42)
    assert _ids(a.x_train) == _ids(b.x_train)
    assert _ids(a.x_test) == _ids(b.x_test)
    c = split_dataset(dataset, seed=43)
    assert set(_ids(a.x_test)) != set(_ids(c.x_test))
    assert set(_ids(a.x_train)) != set(_ids(c.x_train))


def test_test_split_is_shuffled_not_the_tail_of_the_file(tmp_path: Path) -> None:
    # the test split is shuffled: it is not simply the last 15% of the file
    split = split_dataset(_indexed_dataset(tmp_path), seed=0)
    assert sorted(_ids(split.x_test)) != list(range(170, 200))


def test_scaling_fit_uses_what_it_is_given() -> None:
    x = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]], dtype=np.float32)
    scaling = Scaling.fit(x)
    np.testing.assert_allclose(scaling.mean, [3.0, 5.0])
    np.testing.assert_allclose(scaling.std, [np.std([1, 3, 5]), 1.0])  # constant: std 1
    assert scaling.mean.dtype == np.float32


def test_training_scales_with_train_split_statistics_only(tmp_path: Path) -> None:
    # Column 0 is the record index, column 1 is 1000 for a handful of records that the split
    # puts outside the training split; a leak would show up in both means.
    dataset = _indexed_dataset(tmp_path)
    split = split_dataset(dataset, seed=0)
    held_out = set(_ids(split.x_val)) | set(_ids(split.x_test))
    outliers = sorted(held_out)[:5]
    records = make_records(200, value=lambda i, c: float(i) if c == 0 else (i * c % 13) / 13)
    for i in outliers:
        records[i]["user_vibe_dimensions"]["community_orientation"] = 1000.0
    crafted = load_dataset(write_json(tmp_path / "crafted.json", records))
    crafted_split = split_dataset(crafted, seed=0)
    assert _ids(crafted_split.x_train) == _ids(split.x_train)

    result = train_model(crafted_split, TrainConfig(epochs=1, seed=0))
    mean = result.model.feature_mean.numpy()
    train_mean = crafted_split.x_train.mean(axis=0)
    overall_mean = crafted.features.mean(axis=0)
    np.testing.assert_allclose(mean, train_mean, rtol=1e-5, atol=1e-5)
    assert abs(mean[0] - overall_mean[0]) > 0.1
    assert mean[1] < 1.0  # the held-out outliers did not move it
    assert overall_mean[1] > 20.0
    train_std = crafted_split.x_train.std(axis=0)
    train_std[train_std < 1e-6] = 1.0  # constant columns pass through unscaled
    np.testing.assert_allclose(result.model.feature_std.numpy(), train_std, rtol=1e-5)


# --- labels that do not vary ---------------------------------------------------------------


@pytest.mark.parametrize("label", [0.42, 0.7, 0.1, 1 / 3])
@pytest.mark.parametrize("n", [100, 1000])
def test_identical_labels_are_refused_whatever_float32_makes_of_them(
    tmp_path: Path, label: float, n: int
) -> None:
    # float32 rounding made the float32 standard deviation of 100 x 0.42 about 3e-8, not 0
    records = [
        make_record(i, value=lambda i, c: (i * 7 + c) % 11 / 10, label=label) for i in range(n)
    ]
    dataset = load_dataset(write_json(tmp_path / "same.json", records))
    report = check_dataset(dataset)
    assert report.label_std == 0.0
    assert report.problems == (f"every label is {label:g}: there is nothing to learn",)
    with pytest.raises(DataError, match=r"same\.json: cannot be trained on: every label is"):
        require_trainable(dataset)


def test_labels_that_hardly_vary_are_refused_with_their_spread(tmp_path: Path) -> None:
    records = [make_record(i, label=0.5 + (1e-5 if i % 2 else -1e-5)) for i in range(40)]
    report = check_dataset(load_dataset(write_json(tmp_path / "flat.json", records)))
    assert len(report.problems) == 2  # the features are constant too
    problem = report.problems[0]
    assert problem.startswith("the labels hardly vary (from 0.49999 to 0.50001, ")
    assert "standard deviation 1e-05" in problem
    assert f"at least {MIN_LABEL_STD:g} is needed" in problem
    assert problem.endswith("there is nothing to learn")


def test_labels_that_vary_enough_are_accepted(tmp_path: Path) -> None:
    records = make_records(40)
    for i, record in enumerate(records):
        record["outcome_score"] = 0.5 + (2e-4 if i % 2 else -2e-4)
    report = check_dataset(load_dataset(write_json(tmp_path / "d.json", records)))
    assert report.label_std == pytest.approx(2e-4, rel=1e-3)
    assert report.problems == ()


def test_data_check_refuses_a_file_whose_labels_are_all_0_42(
    run_cli: RunCli, tmp_path: Path
) -> None:
    records = make_records(100)
    for record in records:
        record["outcome_score"] = 0.42
    path = write_json(tmp_path / "same.json", records)
    result = run_cli("data", "check", path)
    assert_clean_failure(result, "same.json: cannot be trained on", "every label is 0.42")
    assert "OK" not in result.stdout


# --- CSV columns named twice ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "fragments"),
    [
        ("user,a,score,b,score", ("column 'score' appears more than once", "columns 3 and 5")),
        ("a,b,a,score,a", ("column 'a' appears more than once", "columns 1, 3 and 5")),
        ("a,,score,", ("columns 2 and 4 have no name",)),
        ("a, score,score ", ("column 'score' appears more than once", "columns 2 and 3")),
    ],
    ids=["target-twice", "feature-three-times", "unnamed-twice", "same-after-spaces"],
)
def test_csv_with_a_column_named_twice_is_refused(
    tmp_path: Path, header: str, fragments: tuple[str, ...]
) -> None:
    width = header.count(",") + 1
    rows = [",".join(f"{(i + c) % 10 / 10}" for c in range(width)) for i in range(25)]
    path = _csv(tmp_path, header, rows, name="twice.csv")
    with pytest.raises(DataError) as excinfo:
        load_dataset(path, target="score")
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message
    assert "rename or remove" in message or "name them or remove them" in message
    assert "\n" not in message


def test_data_check_refuses_a_csv_with_the_target_twice(run_cli: RunCli, tmp_path: Path) -> None:
    rows = [f"{i / 100},{i % 10 / 10},{i % 10 / 10}" for i in range(25)]
    path = _csv(tmp_path, "a,score,score", rows, name="leak.csv")
    result = run_cli("data", "check", path, "--target", "score")
    assert_clean_failure(result, "leak.csv", "column 'score' appears more than once")
    assert result.stdout == ""


# --- metadata.irreducible_mse --------------------------------------------------------------


def _with_floor(tmp_path: Path, floor_text: str) -> Path:
    path = tmp_path / "floor.json"
    records = json.dumps(make_records(25))
    path.write_text(
        f'{{"metadata": {{"irreducible_mse": {floor_text}}}, "training_data": {records}}}',
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    "floor_text",
    ["0", "0.0", "-1", "NaN", "Infinity", "1e400", "0.3", "1", "true", '"0.004"', "[0.004]"],
)
def test_a_bad_irreducible_mse_is_refused_at_load(tmp_path: Path, floor_text: str) -> None:
    path = _with_floor(tmp_path, floor_text)
    with pytest.raises(DataError) as excinfo:
        load_dataset(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: metadata.irreducible_mse is ")
    assert "a positive number no larger than 0.25" in message
    assert "the largest variance a label in [0, 1] can have" in message
    assert message.endswith("fix it or remove it")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("floor_text", "expected"), [("0.25", 0.25), ("1e-09", 1e-9), ("0.004", 0.004), ("null", None)]
)
def test_a_good_irreducible_mse_is_kept(
    tmp_path: Path, floor_text: str, expected: float | None
) -> None:
    assert load_dataset(_with_floor(tmp_path, floor_text)).irreducible_mse == expected


def test_a_hand_made_dataset_never_hands_out_a_bad_floor(tiny_dataset: Dataset) -> None:
    from dataclasses import replace

    broken = replace(tiny_dataset, metadata={"irreducible_mse": float("nan")})
    with pytest.raises(DataError, match=r"metadata\.irreducible_mse is nan"):
        _ = broken.irreducible_mse


def test_data_check_refuses_a_zero_irreducible_mse(run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli("data", "check", _with_floor(tmp_path, "0"))
    assert_clean_failure(result, "floor.json: metadata.irreducible_mse is 0", "fix it or remove it")


# --- values too far apart to scale in float32 ----------------------------------------------


def test_values_near_the_float32_maximum_are_refused_naming_the_first(tmp_path: Path) -> None:
    # Both are below float32's maximum, but their difference is not: scaling overflowed and
    # every training run failed with "try a lower learning rate".
    records = make_records(60)
    records[7]["context_features"]["energy_match"] = 3e38
    records[12]["context_features"]["energy_match"] = -3e38
    records[30]["user_vibe_dimensions"]["crowd_tolerance"] = 3e38
    path = write_json(tmp_path / "huge.json", records)
    with pytest.raises(DataError) as excinfo:
        load_dataset(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: record 7, field 'context_features.energy_match': 3e+38 ")
    assert "1e+18" in message
    assert "median" in message
    assert message.endswith("fix or remove the record")


def test_the_spread_limit_is_exact(tmp_path: Path) -> None:
    at_limit = float(np.float32(MAX_FEATURE_SPREAD))  # the largest float32 not above it
    beyond = float(np.nextafter(np.float32(at_limit), np.float32(np.inf)))
    assert at_limit <= MAX_FEATURE_SPREAD < beyond
    records = make_records(25, value=lambda i, c: 0.0)
    records[4]["timing_features"]["user_patterns"] = at_limit
    assert load_dataset(write_json(tmp_path / "at.json", records)).n_records == 25
    records[4]["timing_features"]["user_patterns"] = beyond
    with pytest.raises(DataError, match=r"record 4, field 'timing_features\.user_patterns'"):
        load_dataset(write_json(tmp_path / "beyond.json", records))


def test_large_values_close_together_are_accepted(tmp_path: Path) -> None:
    # nanosecond timestamps: huge, but within seconds of each other
    records = make_records(25)
    for i, record in enumerate(records):
        record["context_features"]["location_proximity"] = 1.7e18 + i * 1e12
    dataset = load_dataset(write_json(tmp_path / "ns.json", records))
    assert dataset.features[3, 24] == pytest.approx(1.7e18 + 3e12, rel=1e-6)


def test_values_spread_to_the_limit_still_train(tmp_path: Path) -> None:
    # the limit is safe: values 2e18 apart (the widest it allows) train to finite losses
    # whichever records the split puts in training
    records = make_records(60)
    for i, record in enumerate(records):
        record["context_features"]["energy_match"] = 0.99e18 if i % 2 else -0.99e18
    split = split_dataset(load_dataset(write_json(tmp_path / "wide.json", records)), seed=0)
    for result in (
        train_model(split, TrainConfig(epochs=2, seed=0)),
        train_one(split, TrainConfig(epochs=2, seed=0)),
    ):
        assert np.isfinite([result.train_loss, result.val_loss, result.test_loss]).all()


def test_csv_values_too_far_apart_are_refused(tmp_path: Path) -> None:
    rows = [f"{i / 10},{i % 10 / 10}" for i in range(25)]
    rows[9] = "-3e38,0.5"
    rows[11] = "3e38,0.5"
    path = _csv(tmp_path, "a,score", rows)
    with pytest.raises(DataError, match=r"d\.csv: record 9, field 'a': -3e\+38 "):
        load_dataset(path, target="score")


def test_data_check_refuses_values_that_cannot_be_scaled(run_cli: RunCli, tmp_path: Path) -> None:
    records = make_records(30)
    records[3]["spot_vibe_dimensions"]["spot_rating"] = 3e38  # not a model input: ignored
    records[5]["spot_vibe_dimensions"]["novelty_seeking"] = 3.3e38
    records[6]["spot_vibe_dimensions"]["novelty_seeking"] = -3.3e38
    result = run_cli("data", "check", write_json(tmp_path / "huge.json", records))
    assert_clean_failure(
        result, "huge.json: record 5, field 'spot_vibe_dimensions.novelty_seeking'"
    )
    assert result.stdout == ""


# --- files no parser can follow ------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a": ' * 100_000 + "1" + "}" * 100_000,
        '{"metadata": ' + "[" * 100_000 + "]" * 100_000 + ', "training_data": []}',
        json.dumps(make_records(3))[:-1] + ", " + "[" * 5000 + "]" * 5000 + "]",
    ],
    ids=["lists", "objects", "in-metadata", "as-a-record"],
)
def test_json_nested_too_deeply_is_one_data_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_dataset(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: JSON nested too deeply to read")
    assert "is this the app's export?" in message


def test_data_check_on_json_nested_100000_deep_fails_cleanly(
    run_cli: RunCli, tmp_path: Path
) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    assert_clean_failure(run_cli("data", "check", path), "deep.json: JSON nested too deeply")


def test_csv_cell_too_large_for_the_csv_reader_is_a_data_error(tmp_path: Path) -> None:
    rows = [f"{i},{i % 10 / 10}" for i in range(25)]
    rows[20] = '"' + "x" * 200_000 + '",0.5'
    path = _csv(tmp_path, "a,score", rows)
    with pytest.raises(DataError, match=r"d\.csv: line 22: cannot be read as CSV \(field larger"):
        load_dataset(path, target="score")


def test_a_huge_value_is_shown_short_in_the_message(tmp_path: Path) -> None:
    records = make_records(25)
    records[2]["timing_features"]["user_patterns"] = "x" * 100_000
    records[3]["timing_features"]["user_patterns"] = list(range(10_000))
    with pytest.raises(DataError) as excinfo:
        load_dataset(write_json(tmp_path / "d.json", records))
    assert len(str(excinfo.value)) < 250
    records[2]["timing_features"]["user_patterns"] = 0.5
    with pytest.raises(DataError, match="a list is not a number"):
        load_dataset(write_json(tmp_path / "d.json", records))


def test_a_target_with_a_line_break_is_named_on_one_line(tmp_path: Path) -> None:
    # found by tests/test_fuzz.py: the message quoted the --target value as it came
    path = _csv(tmp_path, "a,score", [f"{i},{i % 10 / 10}" for i in range(25)])
    with pytest.raises(DataError) as excinfo:
        load_dataset(path, target="score\n")
    assert str(excinfo.value) == f"{path}: no column 'score\\n' for --target; columns are: a, score"


# --- the whole-file path agrees with the per-record rules -------------------------------------

_NAMES_BY_GROUP = {group: names for group, names in FEATURE_GROUPS}
_value = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False), st.integers(-(10**6), 10**6), st.just(0.5)
)


@st.composite
def _plain_record(draw: st.DrawFn) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for group, names in _NAMES_BY_GROUP.items():
        if draw(st.integers(0, 9)) == 0:
            continue  # a missing group: every input 0.5
        keys = draw(st.lists(st.sampled_from(names), unique=True))
        extra = draw(st.lists(st.sampled_from(["social_preference", "spot_rating", "x"])))
        record[group] = {k: draw(_value) for k in [*keys, *extra]}
    record["outcome_score"] = 0.5
    return record


@settings(max_examples=60, deadline=None)
@given(st.lists(_plain_record(), min_size=1, max_size=20))
def test_plain_files_load_as_the_per_record_rules_say(records: list[dict[str, Any]]) -> None:
    from calling_score_opt.data import _plain_features, fill_features

    plain = _plain_features(records)
    assert plain is not None
    features, defaulted, ignored = plain
    expected = np.empty_like(features)
    expected_defaulted = np.zeros_like(defaulted)
    expected_ignored: dict[str, dict[str, int]] = {}
    for i, record in enumerate(records):
        fill_features(record, expected[i], f"record {i}", expected_defaulted, expected_ignored)
    np.testing.assert_array_equal(features, expected)
    np.testing.assert_array_equal(defaulted, expected_defaulted)
    assert ignored == expected_ignored


@pytest.mark.parametrize(
    "value", [True, None, "0.5", [0.5], {"v": 1}, math.inf, math.nan, 10**400, 1e39]
)
def test_a_record_that_is_not_plain_takes_the_path_that_names_the_field(value: object) -> None:
    from calling_score_opt.data import _plain_features

    records = make_records(5)
    records[3]["context_features"]["user_receptivity"] = value
    assert _plain_features(records) is None


# --- the parsed-data cache of a study's folder ------------------------------------------------


def test_a_cached_load_gives_the_same_dataset_without_parsing(
    synth_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from calling_score_opt import data

    cache = tmp_path / "cache"
    first = load_dataset(synth_file, cache_dir=cache)
    assert len(list(cache.glob("parsed-data-*.npz"))) == 1

    def no_parsing(*args: object) -> None:
        raise AssertionError("the file was parsed again")

    monkeypatch.setattr(data, "_load_json", no_parsing)
    again = load_dataset(synth_file, cache_dir=cache)
    np.testing.assert_array_equal(again.features, first.features)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert again.defaulted is not None and first.defaulted is not None
    np.testing.assert_array_equal(again.defaulted, first.defaulted)
    for name in ("path", "feature_names", "fingerprint", "metadata", "label_sources",
                 "ignored_columns", "ignored_keys"):  # fmt: skip
        assert getattr(again, name) == getattr(first, name), name


def test_an_edited_file_is_parsed_again_never_served_from_the_cache(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", make_records(30))
    cache = tmp_path / "cache"
    load_dataset(path, cache_dir=cache)
    records = make_records(30)
    records[0]["outcome_score"] = 0.99
    write_json(path, records)
    assert load_dataset(path, cache_dir=cache).labels[0] == pytest.approx(0.99)
    records[1]["outcome_score"] = "oops"
    write_json(path, records)
    with pytest.raises(DataError, match="record 1"):
        load_dataset(path, cache_dir=cache)


def test_a_damaged_or_unwritable_cache_only_costs_time(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", make_records(30))
    cache = tmp_path / "cache"
    expected = load_dataset(path, cache_dir=cache)
    (cached,) = cache.glob("*.npz")
    cached.write_bytes(b"damaged")
    np.testing.assert_array_equal(load_dataset(path, cache_dir=cache).labels, expected.labels)
    assert cached.read_bytes() != b"damaged"  # written again
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    np.testing.assert_array_equal(load_dataset(path, cache_dir=blocked).labels, expected.labels)


def test_the_cache_keeps_only_the_newest_parses(tmp_path: Path) -> None:
    from calling_score_opt.data import CACHED_PARSES_KEPT

    cache = tmp_path / "cache"
    for version in range(CACHED_PARSES_KEPT + 2):
        records = make_records(30)
        records[0]["outcome_score"] = version / 10
        load_dataset(write_json(tmp_path / "d.json", records), cache_dir=cache)
    assert len(list(cache.glob("parsed-data-*.npz"))) == CACHED_PARSES_KEPT
    newest = (CACHED_PARSES_KEPT + 1) / 10
    assert load_dataset(tmp_path / "d.json", cache_dir=cache).labels[0] == pytest.approx(newest)
