"""``cso registry register`` checks that a new model takes the active version's inputs.

The app feeds every version of a model type the same 39 columns; a model trained on other ones,
or on the same in another order, runs and scores in [0, 1] all the same. So a model whose feature
spec differs from the active version's is refused (one line, exit 2, the registry unchanged)
unless ``--new-feature-spec REASON`` says why, and the reason is recorded with the version.

Most models here are hand-made contract models (one MatMul and a Sigmoid) whose metadata says
whatever the test needs; the trial and ensemble paths use a tiny grid's study.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from helpers import assert_clean_failure
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner, Result

from calling_score_opt.data import FEATURE_NAMES
from calling_score_opt.export import feature_spec_hash, read_metadata
from calling_score_opt.grid import GridSettings, onnx_filename, run_grid
from calling_score_opt.registry_cli import registry_app

REGISTRY = Path("assets/models/registry.json")
GRID_DIR = Path("assets/models/optimized")
ACTIVE = "v1.0-hybrid"
SPEC = feature_spec_hash(FEATURE_NAMES)
# columns 2 and 3 swapped: the same 39 inputs in another order
SWAPPED = (*FEATURE_NAMES[:2], FEATURE_NAMES[3], FEATURE_NAMES[2], *FEATURE_NAMES[4:])
REASON = "app 2.4 builds the user vibe columns in the new order"
STUDY = "calling-score-grid"
_COMPUTE = "compute"


def _invoke(*args: object) -> Result:
    return CliRunner().invoke(registry_app, [str(a) for a in args], env={"COLUMNS": "200"})


def _ok(*args: object) -> Result:
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def _versions() -> dict[str, Any]:
    document = json.loads(REGISTRY.read_text(encoding="utf-8"))
    versions: dict[str, Any] = document["model_types"]["calling_score"]["versions"]
    return versions


def _model(
    path: Path,
    names: Sequence[str] | None = FEATURE_NAMES,
    spec_hash: str | None = _COMPUTE,
    **metadata: str,
) -> Path:
    """A model that obeys the app's contract, whose metadata names ``names`` (None: no
    feature_names) and ``spec_hash`` (default: computed as cso's export does; None: none, as
    an older cso wrote)."""
    weight = numpy_helper.from_array(np.full(39, 0.01, dtype=np.float32), "weight")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "weight"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["output"]),
        ],
        "hand_made",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 39])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N"])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    props = {"model_type": "calling_score", **metadata}
    if names is not None:
        props["feature_names"] = json.dumps(list(names))
    if spec_hash == _COMPUTE and names is not None:
        props["feature_spec_hash"] = feature_spec_hash(names)
    elif spec_hash not in (None, _COMPUTE):
        props["feature_spec_hash"] = spec_hash
    onnx.helper.set_model_props(model, props)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def _register(version: str, model: Path, *options: str) -> Result:
    return _invoke(
        "register", "--version", version, "--model", model, "--data-source", "synthetic", *options
    )


@pytest.fixture
def active(tmp_path: Path) -> Path:
    """A registry whose active version, v1.0-hybrid, takes the 39 inputs in the contract's
    order (its model file: active.onnx). Returns the registry."""
    _ok(*("register", "--version", ACTIVE, "--data-source", "synthetic"),
        "--model", _model(tmp_path / "active.onnx"))  # fmt: skip
    _ok("promote", ACTIVE)
    return tmp_path / REGISTRY


# --- accepted ----------------------------------------------------------------------------------


def test_the_first_version_has_nothing_to_compare_with_and_records_its_hash(
    tmp_path: Path,
) -> None:
    result = _ok(*("register", "--version", "v1", "--data-source", "synthetic"),
                 "--model", _model(tmp_path / "model.onnx", SWAPPED))  # fmt: skip
    assert "(no active version to compare with)" in result.stdout
    record = _versions()["v1"]
    assert record["featureSpecHash"] == feature_spec_hash(SWAPPED)
    assert "featureSpecChange" not in record


def test_a_model_with_the_active_versions_inputs_is_registered(
    active: Path, tmp_path: Path
) -> None:
    result = _ok(*("register", "--version", "v1.1", "--data-source", "synthetic"),
                 "--model", _model(tmp_path / "same.onnx"))  # fmt: skip
    assert f"feature spec {SPEC[:19]}, the same as the active version {ACTIVE}" in result.stdout
    record = _versions()["v1.1"]
    assert record["featureSpecHash"] == SPEC
    assert "featureSpecChange" not in record
    # the app's fields come first, as they always did
    assert list(record)[:3] == ["version", "modelPath", "defaultWeight"]


def test_a_model_from_an_older_cso_with_the_same_names_and_no_hash_is_registered(
    active: Path, tmp_path: Path
) -> None:
    _ok(*("register", "--version", "legacy", "--data-source", "synthetic"),
        "--model", _model(tmp_path / "legacy.onnx", spec_hash=None))  # fmt: skip
    assert _versions()["legacy"]["featureSpecHash"] == SPEC  # computed from its names


def test_an_active_version_from_an_older_cso_is_compared_by_its_names(tmp_path: Path) -> None:
    _ok(*("register", "--version", "old", "--data-source", "synthetic"),
        "--model", _model(tmp_path / "old.onnx", spec_hash=None))  # fmt: skip
    _ok("promote", "old")
    _ok(*("register", "--version", "new", "--data-source", "synthetic"),
        "--model", _model(tmp_path / "new.onnx"))  # fmt: skip
    before = REGISTRY.read_bytes()
    assert_clean_failure(
        _register("swapped", _model(tmp_path / "swapped.onnx", SWAPPED)),
        "swapped.onnx takes its 39 inputs in another order than the active version old",
    )
    assert REGISTRY.read_bytes() == before


def test_new_feature_spec_registers_it_and_records_why(active: Path, tmp_path: Path) -> None:
    result = _register(
        "v2", _model(tmp_path / "swapped.onnx", SWAPPED), "--new-feature-spec", REASON
    )
    assert result.exit_code == 0, result.output
    assert f"NEW, the active version {ACTIVE} has {SPEC[:19]}" in result.stdout
    assert f"reason recorded: {REASON}" in result.stdout
    record = _versions()["v2"]
    assert record["featureSpecHash"] == feature_spec_hash(SWAPPED)
    assert record["featureSpecChange"] == {
        "reason": REASON,
        "activeVersion": ACTIVE,
        "from": SPEC,
        "to": feature_spec_hash(SWAPPED),
    }
    assert f'"reason": "{REASON}"' in _ok("show", "v2").stdout
    listing = _ok("list").stdout
    assert re.search(rf"v2\s.*{feature_spec_hash(SWAPPED)[7:15]} new", listing), listing
    assert re.search(rf"{re.escape(ACTIVE)}\s.*{SPEC[7:15]}\s", listing), listing

    # once it is active, the old order is the one that needs a reason
    _ok("promote", "v2", "--without-ab-test")
    assert_clean_failure(
        _register("v3", _model(tmp_path / "old_order.onnx")),
        "old_order.onnx takes its 39 inputs in another order than the active version v2",
    )


def test_new_feature_spec_with_an_unchanged_spec_records_nothing(
    active: Path, tmp_path: Path
) -> None:
    result = _register("v2", _model(tmp_path / "same.onnx"), "--new-feature-spec", REASON)
    assert result.exit_code == 0, result.output
    assert "(--new-feature-spec not recorded)" in result.stdout
    assert "featureSpecChange" not in _versions()["v2"]


# --- refused: one line, exit 2, the registry unchanged ----------------------------------------

OTHER_INPUT = (*FEATURE_NAMES[:5], "user_vibe_dimensions.weather_mood", *FEATURE_NAMES[6:])
RENAMED = "context_features.location_proximity"
REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "another order": (
        {"names": SWAPPED},
        f"model.onnx takes its 39 inputs in another order than the active version {ACTIVE} "
        f"(column 2: {FEATURE_NAMES[3]} vs {FEATURE_NAMES[2]} in {ACTIVE})",
    ),
    "another input": (
        {"names": OTHER_INPUT},
        f"model.onnx takes other inputs than the active version {ACTIVE} (column 5: "
        f"user_vibe_dimensions.weather_mood vs {FEATURE_NAMES[5]} in {ACTIVE})",
    ),
    "one input more": (
        {"names": (*FEATURE_NAMES, RENAMED + "_2")},
        f"model.onnx takes 40 inputs, the active version {ACTIVE} takes 39 (column 39: "
        f"{RENAMED}_2 vs none in {ACTIVE})",
    ),
    "older cso, another order": (
        {"names": SWAPPED, "spec_hash": None},
        "model.onnx takes its 39 inputs in another order",
    ),
    "another missing-value rule": (
        {"spec_hash": "sha256:" + "0" * 64},
        f"model.onnx takes the same 39 inputs as the active version {ACTIVE} but fills them "
        f"by another rule (feature spec sha256:000000000000 vs {SPEC[:19]})",
    ),
    "only a hash, another one": (
        {"names": None, "spec_hash": "sha256:" + "1" * 64},
        f"model.onnx takes other inputs than the active version {ACTIVE} (feature spec "
        f"sha256:111111111111 vs {SPEC[:19]})",
    ),
    "no feature names": (
        {"names": None, "spec_hash": None},
        "cannot tell which inputs model.onnx was trained on (its metadata has no "
        f"feature_names), so it cannot be checked against the active version {ACTIVE}",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_model_with_other_inputs_is_refused_and_the_registry_is_unchanged(
    active: Path, tmp_path: Path, case: str
) -> None:
    options, fragment = REFUSALS[case]
    model = _model(tmp_path / "model.onnx", **options)
    before = active.read_bytes()
    message = assert_clean_failure(_register("v2", model), fragment)
    assert 'pass --new-feature-spec "REASON" if the app\'s feature builder changes' in message
    assert active.read_bytes() == before
    # the same model, told why: registered, with the reason
    _ok(*("register", "--version", "v2", "--model", model, "--data-source", "synthetic"),
        "--new-feature-spec", REASON)  # fmt: skip
    assert _versions()["v2"]["featureSpecChange"]["reason"] == REASON


def test_an_active_version_that_names_no_inputs_cannot_be_compared(tmp_path: Path) -> None:
    _ok(*("register", "--version", "foreign", "--data-source", "synthetic"),
        "--model", _model(tmp_path / "foreign.onnx", None, None))  # fmt: skip
    _ok("promote", "foreign")
    before = REGISTRY.read_bytes()
    assert_clean_failure(
        _register("v2", _model(tmp_path / "model.onnx")),
        "cannot tell which inputs the active version foreign was trained on",
    )
    assert REGISTRY.read_bytes() == before


@pytest.mark.parametrize("damage", ["missing", "changed", "unreadable"])
def test_an_active_model_file_that_cannot_be_read_is_one_clear_line(
    active: Path, tmp_path: Path, damage: str
) -> None:
    active_file = tmp_path / "active.onnx"
    if damage == "missing":
        active_file.unlink()
        fragment = f"the active version {ACTIVE}'s model file active.onnx is missing"
    elif damage == "changed":
        _model(active_file, SWAPPED)
        fragment = "active.onnx has changed since it was registered (its sha256 differs)"
    else:  # the registered file is garbage: an old registry could hold one
        active_file.write_bytes(b"not an onnx file")
        document = json.loads(active.read_text())
        sha = hashlib.sha256(b"not an onnx file").hexdigest()
        document["model_types"]["calling_score"]["versions"][ACTIVE]["sha256"] = sha
        active.write_text(json.dumps(document))
        fragment = f"cannot read the active version {ACTIVE}'s model file active.onnx ("
    before = active.read_bytes()
    message = assert_clean_failure(_register("v2", _model(tmp_path / "model.onnx")), fragment)
    assert "so model.onnx's inputs cannot be checked against it; restore it" in message
    assert 'or pass --new-feature-spec "REASON" to register without the check' in message
    assert active.read_bytes() == before
    # told why, it is registered, against the hash recorded for the active version
    _ok(*("register", "--version", "v2", "--model", tmp_path / "model.onnx"),
        "--data-source", "synthetic", "--new-feature-spec", REASON)  # fmt: skip
    assert "featureSpecChange" not in _versions()["v2"]  # the recorded hash is the same


def test_new_feature_spec_needs_a_reason(active: Path, tmp_path: Path) -> None:
    before = active.read_bytes()
    model = _model(tmp_path / "model.onnx", SWAPPED)
    assert_clean_failure(
        _register("v2", model, "--new-feature-spec", "  "), "--new-feature-spec needs a reason"
    )
    assert active.read_bytes() == before


def test_a_grid_variant_is_checked_too(active: Path, tmp_path: Path) -> None:
    _model(tmp_path / GRID_DIR / onnx_filename("x"), SWAPPED, variant="x")
    before = active.read_bytes()
    assert_clean_failure(
        _invoke("register", "--version", "v2", "--variant", "x", "--data-source", "synthetic"),
        f"{onnx_filename('x')} takes its 39 inputs in another order",
    )
    assert active.read_bytes() == before


# --- the study paths: a trial exported on the spot, an ensemble built on the spot --------------


@pytest.fixture(scope="module")
def grid_run(synth_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny grid variants and the study they are stored in."""
    root = tmp_path_factory.mktemp("grid")
    run_grid(
        GridSettings(
            data_path=synth_file,
            output_dir=root / "optimized",
            max_variants=2,
            epochs=2,
            jobs=1,
            storage_url=f"sqlite:///{root}/studies/g.db",
        )
    )
    return root


def test_cso_exports_carry_the_hash_and_registration_records_it(grid_run: Path) -> None:
    shutil.copytree(grid_run / "optimized", GRID_DIR)
    variant = "v1_0_baseline"
    assert read_metadata(GRID_DIR / onnx_filename(variant))["feature_spec_hash"] == SPEC
    _ok("register", "--version", "v1", "--variant", variant, "--data-source", "synthetic")
    assert _versions()["v1"]["featureSpecHash"] == SPEC


def test_trial_and_ensemble_registrations_are_checked_and_leave_nothing_behind(
    grid_run: Path, tmp_path: Path
) -> None:
    storage = f"sqlite:///{grid_run}/studies/g.db"
    from_study = ("--study", STUDY, "--storage", storage, "--data-source", "synthetic")
    trial = read_metadata(grid_run / "optimized" / onnx_filename("v1_0_baseline"))["trial_number"]

    # the active version takes the inputs in the contract's order: the ensemble matches it
    _ok(*("register", "--version", ACTIVE, "--data-source", "synthetic"),
        "--model", _model(tmp_path / "active.onnx"))  # fmt: skip
    _ok("promote", ACTIVE)
    _ok("register", "--version", "ens", "--ensemble", *from_study)
    assert _versions()["ens"]["featureSpecHash"] == SPEC

    # another order is active now: the study's models no longer fit the app's feature builder
    swapped = _model(tmp_path / "swapped.onnx", SWAPPED)
    _ok(*("register", "--version", "swapped", "--data-source", "synthetic"),
        "--model", swapped, "--new-feature-spec", REASON)  # fmt: skip
    _ok("promote", "swapped", "--without-ab-test")
    before = REGISTRY.read_bytes()
    versions_dir = tmp_path / "assets/models/versions"
    for source in (("--trial", trial), ("--ensemble",)):
        assert_clean_failure(
            _invoke("register", "--version", "v2", *source, *from_study),
            "takes its 39 inputs in another order than the active version swapped (column 2:",
        )
        assert REGISTRY.read_bytes() == before
        assert sorted(p.name for p in (versions_dir / "calling_score").iterdir()) == ["ens"]
        assert [p.name for p in versions_dir.iterdir() if p.name.startswith(".")] == []


def test_a_stated_hash_does_not_hide_reordered_names(active: Path, tmp_path: Path) -> None:
    """Metadata edited to reorder the inputs but keep the active version's hash is refused."""
    model = _model(tmp_path / "model.onnx", SWAPPED, spec_hash=SPEC)
    before = active.read_bytes()
    assert_clean_failure(_register("v2", model), "takes its 39 inputs in another order")
    assert active.read_bytes() == before
