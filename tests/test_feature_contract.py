"""The features the app must build (docs/app-integration.md): one record's inputs, the test
vectors in docs/feature_vectors.json, and ``cso contract check`` on the app's own vectors."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from helpers import assert_clean_failure, files_under, write_json
from typer.testing import Result

from calling_score_opt.data import FEATURE_NAMES, load_dataset
from calling_score_opt.errors import DataError
from calling_score_opt.feature_contract import (
    CONSTANT,
    HOLDS_IGNORED,
    HOLDS_OTHER,
    VALUES,
    compare_vectors,
    expected_vectors,
    feature_vectors,
    feature_vectors_text,
    record_features,
)

RunCli = Callable[..., Result]
ROOT = Path(__file__).resolve().parents[1]
VECTORS_FILE = ROOT / "docs" / "feature_vectors.json"
DOCUMENT = feature_vectors()
CASES = DOCUMENT["cases"]
IDS = [c["id"] for c in CASES]


def _bench() -> ModuleType:
    """bench/app_style_vectors.py: the app's live builder of today, in Python."""
    spec = importlib.util.spec_from_file_location(
        "app_style_vectors", ROOT / "bench" / "app_style_vectors.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


APP_STYLE = _bench()


def _correct() -> dict[str, Any]:
    return {"cases": [{"id": c["id"], "features": list(c["features"])} for c in CASES]}


def _dump(path: Path, cases: list[dict[str, Any]]) -> Path:
    return write_json(path, {"cases": cases})


def _check(run_cli: RunCli, document: dict[str, Any], tmp_path: Path, *options: str) -> Result:
    return run_cli("contract", "check", write_json(tmp_path / "app.json", document), *options)


# --- one record's inputs -------------------------------------------------------------------


def test_a_complete_record_gives_its_values_in_the_documented_order() -> None:
    record = CASES[IDS.index("complete")]["record"]
    features = record_features(record)
    assert features.dtype == np.float32
    assert features.shape == (39,)
    for position, name in enumerate(FEATURE_NAMES):
        group, key = name.split(".")
        assert features[position] == np.float32(record[group][key]), name


def test_record_rules_missing_extra_and_out_of_range() -> None:
    record = {
        "user_vibe_dimensions": {"exploration_eagerness": -0.25, "social_preference": 0.9},
        "spot_vibe_dimensions": None,
        "context_features": {"location_proximity": 3, "context_feature_7": 0.1, "note": "x"},
        "outcome_score": 0.4,
    }
    features = record_features(record)
    assert features[0] == np.float32(-0.25)  # kept as given, not clamped
    assert features[24] == 3.0
    assert np.all(features[1:24] == 0.5)  # missing keys, a null group
    assert np.all(features[25:] == 0.5)  # context_feature_7 is not vibe_compatibility
    assert record_features({}).tolist() == [0.5] * 39
    assert record_features({"timing_features": {"user_patterns": 0.123456789012}})[36] == (
        np.float32(0.123456789012)
    )


@pytest.mark.parametrize(
    ("record", "fragments"),
    [
        ([1, 2], ("case 'x' is list, not an object",)),
        ({"context_features": [0.1]}, ("case 'x', field 'context_features': is list",)),
        (
            {"timing_features": {"user_patterns": "high"}},
            ("case 'x', field 'timing_features.user_patterns': 'high' is not a number",),
        ),
        (
            {"user_vibe_dimensions": {"crowd_tolerance": float("nan")}},
            ("field 'user_vibe_dimensions.crowd_tolerance'", "not a finite number"),
        ),
    ],
)
def test_a_bad_record_is_a_data_error_naming_where(record: Any, fragments: tuple[str]) -> None:
    with pytest.raises(DataError) as raised:
        record_features(record, "case 'x'")
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_loading_a_file_of_the_vectors_records_gives_the_vectors(tmp_path: Path) -> None:
    """One implementation: the vectors are exactly what training would see for each record."""
    records = [{**c["record"], "outcome_score": (i % 10) / 10} for i, c in enumerate(CASES)]
    dataset = load_dataset(write_json(tmp_path / "d.json", {"training_data": records}))
    expected = np.array([c["features"] for c in CASES], dtype=np.float32)
    np.testing.assert_array_equal(dataset.features, expected)


# --- the test vectors ----------------------------------------------------------------------


def test_the_committed_vectors_are_what_the_code_produces() -> None:
    assert VECTORS_FILE.read_text(encoding="utf-8") == feature_vectors_text(), (
        "docs/feature_vectors.json is stale; regenerate it with "
        "`cso contract vectors --output docs/feature_vectors.json`"
    )


def test_the_vectors_are_deterministic_and_hold_the_cases_the_app_needs() -> None:
    assert feature_vectors_text() == feature_vectors_text()
    assert DOCUMENT["feature_names"] == list(FEATURE_NAMES)
    assert len(CASES) >= 20
    assert len(set(IDS)) == len(IDS)
    for wanted in (
        "complete",
        "missing-user-vibe-keys",
        "no-context",
        "null-groups",
        "empty-record",
        "user-vibe-extra-keys",
        "other-extra-keys",
        "generator-names",
        "negative-values",
        "values-above-one",
        "integers-and-bounds",
        "many-decimals",
    ):
        assert wanted in IDS
    for case in CASES:
        assert case["description"]
        written = np.array(case["features"], dtype=np.float32)  # the shortest exact decimals
        np.testing.assert_array_equal(written, record_features(case["record"]), case["id"])
    records = {c["id"]: c["record"] for c in CASES}
    assert "social_preference" in records["user-vibe-extra-keys"]["user_vibe_dimensions"]
    assert "spot_rating" in records["other-extra-keys"]["spot_vibe_dimensions"]
    assert "context_feature_7" in records["generator-names"]["context_features"]
    assert min(records["negative-values"]["context_features"].values()) < 0
    assert max(records["values-above-one"]["timing_features"].values()) > 1


def test_every_swap_of_two_positions_shows() -> None:
    table = np.array([c["features"] for c in CASES], dtype=np.float32)
    for p in range(39):
        assert np.ptp(table[:, p]) > 0, FEATURE_NAMES[p]
        for q in range(p + 1, 39):
            same = int(np.isclose(table[:, p], table[:, q], rtol=0, atol=1e-6).sum())
            assert same <= 4, (FEATURE_NAMES[p], FEATURE_NAMES[q])  # only shared 0.5 defaults
    for case in CASES[:3]:  # the complete records: 39 different values, none of them 0.5
        assert len(set(case["features"])) == 39
        assert 0.5 not in case["features"]


def test_cso_contract_vectors_prints_or_writes_the_file(run_cli: RunCli, tmp_path: Path) -> None:
    printed = run_cli("contract", "vectors")
    assert printed.exit_code == 0, printed.output
    assert printed.stdout == VECTORS_FILE.read_text(encoding="utf-8")
    written = run_cli("contract", "vectors", "--output", tmp_path / "v.json")
    assert written.exit_code == 0, written.output
    assert "Wrote the test vectors to" in written.stdout
    assert (tmp_path / "v.json").read_text(encoding="utf-8") == printed.stdout
    assert_clean_failure(run_cli("contract", "vectors", "--output", tmp_path), "is a folder")


# --- cso contract check ----------------------------------------------------------------------


def test_a_correct_dump_agrees(run_cli: RunCli, tmp_path: Path) -> None:
    result = _check(run_cli, _correct(), tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == (
        "OK: the app's features match the expected ones at all 39 positions in all 24 cases "
        "(within 1e-06)"
    )
    assert result.stderr == ""


def test_a_dump_written_in_double_precision_agrees(run_cli: RunCli, tmp_path: Path) -> None:
    """The app computes in doubles: the check compares as float32, as the model does."""
    dump = APP_STYLE.app_vectors(DOCUMENT, "cso")
    many = dump["cases"][IDS.index("many-decimals")]["features"]
    many[8] = 0.123456789012  # the record's value, not its float32
    assert _check(run_cli, dump, tmp_path).exit_code == 0


def test_the_app_builder_of_today_is_named_position_by_position(
    run_cli: RunCli, tmp_path: Path
) -> None:
    result = _check(run_cli, APP_STYLE.app_vectors(DOCUMENT, "live"), tmp_path)
    out = result.stdout
    assert (
        "  position 2 holds user_vibe_dimensions.location_adventurousness, the model expects "
        "user_vibe_dimensions.authenticity_preference\n"
    ) in out
    assert (
        "position 14 holds spot_vibe_dimensions.location_adventurousness, the model expects "
        "spot_vibe_dimensions.authenticity_preference"
    ) in out
    assert (
        "position 3 holds user_vibe_dimensions.authenticity_preference, the model expects " in out
    )
    assert "Positions holding another input than the model expects (16):" in out
    # social_preference / overall_energy: recognised when the records hold them, else constant
    assert (
        "position 10 holds user_vibe_dimensions.social_preference, which is not a model input"
    ) in out
    assert "position 11 holds user_vibe_dimensions.overall_energy" in out
    assert "Positions constant where the model expects data (3):" in out
    assert (
        "position 22 is always 0.5, the model expects spot_vibe_dimensions.value_orientation"
    ) in out
    assert (
        "position 23 is always 0.5, the model expects spot_vibe_dimensions.crowd_tolerance" in out
    )
    assert "position 31 is always 0.5, the model expects context_features.energy_match" in out
    # clamping and the computed inputs: values only, in named cases
    assert (
        "position 24 (context_features.location_proximity) differs in 1 of 24 cases: the app "
        "clamps to [0, 1], cso trains on values as given: negative-values (-0.5 -> 0)"
    ) in out
    vibe_compatibility = next(line for line in out.splitlines() if "position 30 " in line)
    assert "the record lacks the key, so the model expects 0.5 there" in vibe_compatibility
    assert "generator-names" in vibe_compatibility
    assert (
        "positions 0-11 must hold user_vibe_dimensions, in this order: exploration_eagerness, "
        "community_orientation, authenticity_preference, social_discovery_style, "
    ) in out
    assert "positions 12-23 must hold spot_vibe_dimensions" in out
    assert_clean_failure(
        result,
        "the app's features differ from the expected ones at 30 of 39 positions (16 hold another "
        "input, 2 hold a key cso ignores, 3 are constant, 9 differ in value only) in the 24 of "
        "24 cases compared",
    )


def test_with_the_vibe_order_fixed_only_the_rest_remains(run_cli: RunCli, tmp_path: Path) -> None:
    result = _check(run_cli, APP_STYLE.app_vectors(DOCUMENT, "vibe-fixed"), tmp_path)
    assert "holds" not in result.stdout
    assert "must hold" not in result.stdout
    assert_clean_failure(result, "at 10 of 39 positions (1 is constant, 9 differ in value only)")


def test_clamping_is_a_difference_in_value_in_the_out_of_range_cases_only(
    run_cli: RunCli, tmp_path: Path
) -> None:
    dump = _correct()
    for case in dump["cases"]:
        case["features"] = [min(max(v, 0.0), 1.0) for v in case["features"]]
    result = _check(run_cli, dump, tmp_path)
    out = result.stdout
    assert "Positions that differ in value only" in out
    assert "Positions holding" not in out and "constant where" not in out
    assert (
        "position 17 (spot_vibe_dimensions.location_adventurousness) differs in 1 of 24 cases: "
        "the app clamps to [0, 1], cso trains on values as given: large-values (1000000 -> 1)"
    ) in out
    assert_clean_failure(result, "differ in value only")


def test_a_value_that_differs_in_one_case_names_the_case(run_cli: RunCli, tmp_path: Path) -> None:
    dump = _correct()
    dump["cases"][IDS.index("complete-2")]["features"][35] = 0.25
    dump["cases"][IDS.index("no-timing")]["features"][35] = 0.3  # the record lacks the key
    result = _check(run_cli, dump, tmp_path)
    expected = CASES[IDS.index("complete-2")]["features"][35]
    assert (
        "  position 35 (timing_features.optimal_day_of_week) differs in 2 of 24 cases: the record "
        "lacks the key, so the model expects 0.5 there, the app sends a value of its own: "
        f"no-timing (0.3); complete-2 (expected {expected:.7g}, the app sends 0.25)\n"
    ) in result.stdout
    assert_clean_failure(result, "at 1 of 39 positions (1 differs in value only)")


def test_two_swapped_positions_and_a_constant(run_cli: RunCli, tmp_path: Path) -> None:
    dump = _correct()
    for case in dump["cases"]:
        f = case["features"]
        f[24], f[25] = f[25], f[24]
        f[36] = 0.5
    result = _check(run_cli, dump, tmp_path)
    out = result.stdout
    assert (
        "position 24 holds context_features.journey_alignment, the model expects "
        "context_features.location_proximity"
    ) in out
    assert (
        "position 25 holds context_features.location_proximity, the model expects "
        "context_features.journey_alignment"
    ) in out
    assert (
        "position 36 is always 0.5, the model expects timing_features.user_patterns (from " in out
    )
    assert "positions 24-33 must hold context_features, in this order: location_proximity, " in out
    assert_clean_failure(result, "at 3 of 39 positions (2 hold another input, 1 is constant)")


def test_a_swap_is_still_named_when_a_few_cases_also_differ() -> None:
    dump = _correct()
    for case in dump["cases"]:
        f = case["features"]
        f[0], f[1] = f[1], f[0]
    dump["cases"][0]["features"][0] = 0.99
    check = compare_vectors(expected_vectors(), dump["cases"])
    (first,) = [f for f in check.findings if f.position == 0]
    assert first.kind == HOLDS_OTHER
    assert first.holds == "user_vibe_dimensions.community_orientation"
    assert first.cases == ("complete",)
    assert "(23 of 24 cases; not in complete)" in first.message


def test_kinds_of_finding_from_the_library() -> None:
    check = compare_vectors(expected_vectors(), APP_STYLE.app_vectors(DOCUMENT)["cases"])
    kinds = {f.position: f.kind for f in check.findings}
    assert kinds[2] == kinds[21] == HOLDS_OTHER
    assert kinds[10] == kinds[11] == HOLDS_IGNORED
    assert kinds[22] == kinds[23] == kinds[31] == CONSTANT
    assert kinds[24] == kinds[38] == VALUES
    assert 0 not in kinds and 12 not in kinds and 35 not in kinds
    assert not check.agrees


# --- the app's file: problems with cases, and files that cannot be read ----------------------


def test_missing_unknown_and_repeated_cases_are_named(run_cli: RunCli, tmp_path: Path) -> None:
    dump = _correct()
    cases = dump["cases"]
    del cases[IDS.index("empty-record")]
    del cases[IDS.index("complete-3")]
    cases.append({"id": "brand-new-case", "features": [0.5] * 39})
    cases.append(dict(cases[0]))
    result = _check(run_cli, dump, tmp_path)
    out = result.stdout
    assert "22 of 24 cases compared" in out
    assert "Problems with the app's cases (3):" in out
    assert (
        "case 'complete' appears twice (cases[0] and cases[23]); only the first is compared" in out
    )
    assert (
        "1 case id is not in the built-in vectors (docs/feature_vectors.json): brand-new-case"
        in out
    )
    assert "2 expected cases are not in the app's file: complete-3, empty-record" in out
    assert_clean_failure(
        result, "the 22 of 24 cases compared agree at all 39 positions; 3 problems"
    )


def test_wrong_lengths_and_non_numbers_are_named(run_cli: RunCli, tmp_path: Path) -> None:
    dump = _correct()
    for case in dump["cases"]:
        case["features"] = case["features"][:38]
    result = _check(run_cli, dump, tmp_path)
    assert (
        "24 cases have 38 features, the model expects 39: complete, complete-2, " in result.stdout
    )
    assert_clean_failure(result, "no case could be compared")

    dump = _correct()
    cases = dump["cases"]
    cases[1]["features"][7] = "0.5"
    cases[2]["features"][0] = None
    cases[3]["features"][38] = True
    cases[4]["features"] = "0.5, 0.5"
    cases[5]["features"][3] = float("nan")  # json writes NaN, which is no JSON number
    cases[6] = {"features": [0.5] * 39}
    cases[7] = "complete"
    cases[8]["features"][1] = 10**400  # a JSON integer too large for any float
    result = _check(run_cli, dump, tmp_path)
    out = result.stdout
    assert (
        "case 'complete-2': features[7] (user_vibe_dimensions.trust_network_reliance) is '0.5', "
        "not a finite float32 number"
    ) in out
    assert (
        "case 'complete-3': features[0] (user_vibe_dimensions.exploration_eagerness) is None" in out
    )
    assert (
        "case 'keys-in-reverse-order': features[38] (timing_features.timing_alignment) is True"
        in out
    )
    assert "case 'full-export-record': 'features' is '0.5, 0.5', not a list of 39 numbers" in out
    assert "case 'missing-user-vibe-keys': features[3]" in out and "is nan" in out
    assert "cases[6]: 'id' is missing; it must be the id of an expected case" in out
    assert "cases[7] is 'complete', not an object with id and features" in out
    assert (
        "case 'missing-timing-key': features[1] (user_vibe_dimensions.community_orientation) is "
        in out
    )
    assert (
        "2 expected cases are not in the app's file: missing-spot-vibe-keys, missing-conte" in out
    )
    assert_clean_failure(
        result, "the 16 of 24 cases compared agree at all 39 positions; 9 problems"
    )


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (None, ("app.json: file not found",)),
        ('{"cases": [', ("app.json: not valid JSON (line 1", '{"cases": [{"id"')),
        ("[1, 2]", ("app.json: top level is a list; expected the app's vectors",)),
        ('{"vectors": []}', ("app.json: 'cases' is missing, not a list",)),
        ('{"cases": {"complete": []}}', ("app.json: 'cases' is an object, not a list",)),
        ("\x80abc", ("app.json: not UTF-8 text",)),
    ],
    ids=["missing", "not-json", "list", "no-cases", "cases-object", "binary"],
)
def test_an_unreadable_app_file_is_one_error_line(
    run_cli: RunCli, tmp_path: Path, content: str | None, fragments: tuple[str, ...]
) -> None:
    path = tmp_path / "app.json"
    if content is not None:
        path.write_bytes(content.encode("latin-1"))
    before = files_under(tmp_path)
    result = run_cli("contract", "check", path)
    assert_clean_failure(result, *fragments)
    assert result.stdout == ""
    assert files_under(tmp_path) == before


# --- --vectors and --model -------------------------------------------------------------------


def test_vectors_option_compares_against_a_copy(run_cli: RunCli, tmp_path: Path) -> None:
    subset = {**DOCUMENT, "cases": CASES[:3]}
    vectors = write_json(tmp_path / "old_vectors.json", subset)
    dump = {"cases": [{"id": c["id"], "features": c["features"]} for c in CASES[:3]]}
    result = _check(run_cli, dump, tmp_path, "--vectors", vectors)
    assert result.exit_code == 0, result.output
    assert f"3 of 3 cases compared with {vectors}" in result.stdout

    stale = json.loads(json.dumps(subset))
    stale["cases"][1]["features"][4] = 0.123
    write_json(vectors, stale)
    assert_clean_failure(
        _check(run_cli, dump, tmp_path, "--vectors", vectors),
        "case 'complete-2': position 4 (user_vibe_dimensions.temporal_flexibility) is 0.123 in "
        "the file, but cso builds",
        "stale",
        "cso contract vectors --output docs/feature_vectors.json",
    )
    foreign = {**subset, "feature_names": list(FEATURE_NAMES[:38])}
    write_json(vectors, foreign)
    assert_clean_failure(
        _check(run_cli, dump, tmp_path, "--vectors", vectors), "its feature_names are not"
    )
    bad_record = json.loads(json.dumps(subset))
    bad_record["cases"][0]["record"]["context_features"]["network_effects"] = "many"
    write_json(vectors, bad_record)
    assert_clean_failure(
        _check(run_cli, dump, tmp_path, "--vectors", vectors),
        "case 'complete', record, field 'context_features.network_effects': 'many' is not a number",
    )
    assert_clean_failure(
        _check(run_cli, dump, tmp_path, "--vectors", tmp_path / "none.json"),
        "none.json: file not found",
    )


def _model(path: Path, metadata: dict[str, str]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["output"], axes=[1], keepdims=0)],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 39])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(model, metadata)
    onnx.save_model(model, str(path))
    return path


def test_model_option_takes_the_order_the_model_records(run_cli: RunCli, tmp_path: Path) -> None:
    names = list(FEATURE_NAMES)
    names[34], names[35] = names[35], names[34]  # a model whose timing inputs are swapped
    model = _model(tmp_path / "m.onnx", {"feature_names": json.dumps(names)})
    result = _check(run_cli, _correct(), tmp_path, "--model", model)
    assert (
        "position 34 holds timing_features.optimal_time_of_day, the model expects "
        "timing_features.optimal_day_of_week"
    ) in result.stdout
    assert "in the input order of" in result.stdout
    assert_clean_failure(result, "at 2 of 39 positions (2 hold another input)")

    swapped = _correct()
    for case in swapped["cases"]:
        f = case["features"]
        f[34], f[35] = f[35], f[34]
    assert _check(run_cli, swapped, tmp_path, "--model", model).exit_code == 0

    plain = _model(tmp_path / "plain.onnx", {"feature_names": json.dumps(list(FEATURE_NAMES))})
    assert _check(run_cli, _correct(), tmp_path, "--model", plain).exit_code == 0


@pytest.mark.parametrize(
    ("metadata", "fragments"),
    [
        ({}, ("its metadata has no feature_names list",)),
        ({"feature_names": "not json"}, ("its metadata has no feature_names list",)),
        (
            {"feature_names": json.dumps(["a", "b"])},
            ("its inputs are not the app's 39 features (e.g. 'a')", "a CSV?"),
        ),
    ],
    ids=["no-names", "bad-json", "csv-model"],
)
def test_a_model_without_the_apps_inputs_is_refused(
    run_cli: RunCli, tmp_path: Path, metadata: dict[str, str], fragments: tuple[str, ...]
) -> None:
    model = _model(tmp_path / "m.onnx", metadata)
    assert_clean_failure(_check(run_cli, _correct(), tmp_path, "--model", model), *fragments)


def test_a_model_that_is_not_there_or_not_onnx_is_refused(run_cli: RunCli, tmp_path: Path) -> None:
    assert_clean_failure(
        _check(run_cli, _correct(), tmp_path, "--model", tmp_path / "none.onnx"),
        "--model",
        "none.onnx: no such file",
    )
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert_clean_failure(
        _check(run_cli, _correct(), tmp_path, "--model", tmp_path / "junk.onnx"),
        "junk.onnx: not a readable ONNX model",
    )


# --- the script that builds the app-style vectors ----------------------------------------------


def test_the_app_style_script_writes_a_dump_the_check_reads(tmp_path: Path) -> None:
    output = tmp_path / "app_live.json"
    assert APP_STYLE.main(["--builder", "live", "--output", str(output)]) == 0
    dump = json.loads(output.read_text(encoding="utf-8"))
    assert [c["id"] for c in dump["cases"]] == IDS
    live = dump["cases"][IDS.index("user-vibe-extra-keys")]["features"]
    record = CASES[IDS.index("user-vibe-extra-keys")]["record"]["user_vibe_dimensions"]
    assert live[2] == record["location_adventurousness"]  # the app's order
    assert live[10] == record["social_preference"]
    assert live[22] == 0.5
