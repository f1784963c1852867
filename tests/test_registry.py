"""``cso registry``: the guide's Steps 3-5 against a registry file the app could load.

The models are two tiny grid variants (2 epochs on 200 records), trained once per module.
Commands run through ``registry_app`` in-process; every refusal must be one line, exit 2, and
leave the registry file byte for byte as it was.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import typer
from filelock import FileLock
from helpers import assert_clean_failure, postgres_url_or_skip
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner, Result

import calling_score_opt.registry.lock as lock_module
import calling_score_opt.trials as trials_module
from calling_score_opt.errors import StudyError
from calling_score_opt.export import read_metadata
from calling_score_opt.grid import RESULTS_FILENAME, GridSettings, onnx_filename, run_grid
from calling_score_opt.registry import (
    MAX_DEPTH,
    Outcome,
    RegistryError,
    gets_candidate,
    load_registry,
    trial_source,
)
from calling_score_opt.registry_cli import registry_app

Cli = Callable[..., Result]

REGISTRY = Path("assets/models/registry.json")
GRID_DIR = Path("assets/models/optimized")
BASELINE, LR_VARIANT = "v1_0_baseline", "v1_1_lr_0.0001"
SALT = "calling_score:v1.1-hybrid:test"
STUDY = "calling-score-grid"


def _invoke(*args: object) -> Result:
    return CliRunner().invoke(registry_app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture
def cli() -> Cli:
    """``cli("list")`` runs ``cso registry list`` in-process; it must not fail unexpectedly."""
    return _invoke


def _ok(*args: object) -> Result:
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def _document() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REGISTRY.read_text(encoding="utf-8"))
    return data


def _calling_score() -> dict[str, Any]:
    state: dict[str, Any] = _document()["model_types"]["calling_score"]
    return state


# --- fixtures: a tiny grid, and a registry in the middle of a test -----------------------------


@pytest.fixture(scope="module")
def grid_run(synth_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two grid variants with their results file, and the study they are stored in."""
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


def _broken_model(path: Path) -> Path:
    """A model whose output is [N, 1]: the app would read a nested list and fall back to 0.5."""
    weight = numpy_helper.from_array(np.full((39, 1), 0.01, dtype=np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["output"])],
        "broken",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 39])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def project(grid_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project mid-workflow, built once through the CLI.

    calling_score: v0.9 (archived), v1.0-hybrid (active), v1.1-hybrid (staging, in an A/B test
    at 0.1 with salt SALT), v1.2 (staging, never tested). Plus broken.onnx beside it.
    """
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(grid_run / "optimized", root / GRID_DIR)
    _broken_model(root / "broken.onnx")
    with contextlib.chdir(root):
        for args in (
            ("register", "--version", "v0.9", "--variant", BASELINE, "--data-source", "synthetic"),
            ("promote", "v0.9"),
            ("register", "--version", "v1.0-hybrid", "--variant", BASELINE),
            ("promote", "v1.0-hybrid", "--without-ab-test"),
            ("archive", "v0.9"),
            ("register", "--version", "v1.1-hybrid", "--variant", LR_VARIANT),
            ("ab-start", "v1.1-hybrid", "--traffic", "0.1", "--salt", SALT),
            ("register", "--version", "v1.2", "--variant", LR_VARIANT),
        ):
            if args[0] == "register" and "--data-source" not in args:
                args = (*args, "--data-source", "hybrid_big_five")
            _ok(*args)
    return root


@pytest.fixture
def grid_dir(grid_run: Path, tmp_path: Path) -> Path:
    """The grid's files at the default --grid-dir of this test's directory."""
    shutil.copytree(grid_run / "optimized", tmp_path / GRID_DIR)
    return tmp_path / GRID_DIR


@pytest.fixture
def mid_test(project: Path, tmp_path: Path) -> Path:
    """A private copy of ``project`` as this test's working directory; returns the registry."""
    shutil.copytree(project, tmp_path, dirs_exist_ok=True)
    return tmp_path / REGISTRY


# --- the whole workflow ----------------------------------------------------------------------


def test_guide_steps_3_to_5_register_ab_test_ramp_promote_rollback(grid_dir: Path) -> None:
    # Step 3: register the baseline and the variant as staging versions
    first = _ok(
        "register",
        "--version",
        "v1.0-hybrid",
        "--variant",
        BASELINE,
        "--data-source",
        "hybrid_big_five",
    )
    assert "Next: cso registry promote v1.0-hybrid" in first.stdout  # no active version yet
    _ok("promote", "v1.0-hybrid")
    second = _ok(
        "register",
        "--version",
        "v1.1-hybrid",
        "--variant",
        LR_VARIANT,
        "--data-source",
        "hybrid_big_five",
        "--description",
        "v1.1 optimized",
    )
    assert "Next: cso registry ab-start v1.1-hybrid --traffic 0.1" in second.stdout
    state = _calling_score()
    assert state["active"] == "v1.0-hybrid"
    assert state["versions"]["v1.1-hybrid"]["status"] == "staging"
    assert state["versions"]["v1.1-hybrid"]["defaultWeight"] == 0.1
    assert state["versions"]["v1.1-hybrid"]["description"] == "v1.1 optimized"

    # Step 4: A/B test at 10%, then 50% and 100%
    _ok("ab-start", "v1.1-hybrid", "--traffic", "0.1")
    state = _calling_score()
    salt = state["ab_test"]["salt"]
    assert state["ab_test"]["candidate"] == "v1.1-hybrid"
    assert state["ab_test"]["traffic"] == 0.1
    assert state["versions"]["v1.1-hybrid"]["abTestTrafficPercentage"] == 0.1
    assert state["versions"]["v1.1-hybrid"]["abTestStartDate"] == state["ab_test"]["started"]
    users = [f"user_{i}" for i in range(300)]
    at_10 = {u for u in users if gets_candidate(salt, u, 0.1)}
    for user in users[:20]:
        routed = _ok("route", "--user-id", user).stdout
        expected = "v1.1-hybrid" if user in at_10 else "v1.0-hybrid"
        assert routed.startswith(f"{user} -> {expected}\n"), routed
    for share in ("0.5", "1"):
        _ok("ab-set", "v1.1-hybrid", "--traffic", share)
        state = _calling_score()
        assert state["ab_test"]["salt"] == salt  # a ramp keeps the salt: users stay put
        assert state["versions"]["v1.1-hybrid"]["abTestTrafficPercentage"] == float(share)
    assert all(_ok("route", "--user-id", u).stdout.startswith(f"{u} -> v1.1") for u in users[:5])

    # Step 5: switch the active version; the old one is deprecated and the test is over
    promoted = _ok("promote", "v1.1-hybrid")
    assert "was v1.0-hybrid, now deprecated" in promoted.stdout
    state = _calling_score()
    assert state["active"] == "v1.1-hybrid"
    assert state["ab_test"] is None
    assert state["versions"]["v1.1-hybrid"]["status"] == "active"
    assert state["versions"]["v1.1-hybrid"]["abTestTrafficPercentage"] is None
    assert state["versions"]["v1.0-hybrid"]["status"] == "deprecated"
    assert _ok("route", "--user-id", "anyone").stdout.startswith("anyone -> v1.1-hybrid")

    # it does worse in production: roll back to the previous active version
    rolled = _ok("rollback")
    assert "v1.1-hybrid -> v1.0-hybrid" in rolled.stdout
    state = _calling_score()
    assert state["active"] == "v1.0-hybrid"
    assert state["versions"]["v1.0-hybrid"]["status"] == "active"
    assert state["versions"]["v1.1-hybrid"]["status"] == "deprecated"
    events = [(e["event"], e["version"], e["active"], e["previous"]) for e in state["history"]]
    assert events == [
        ("register", "v1.0-hybrid", None, None),
        ("promote", "v1.0-hybrid", "v1.0-hybrid", None),
        ("register", "v1.1-hybrid", "v1.0-hybrid", "v1.0-hybrid"),
        ("ab-start", "v1.1-hybrid", "v1.0-hybrid", "v1.0-hybrid"),
        ("ab-set", "v1.1-hybrid", "v1.0-hybrid", "v1.0-hybrid"),
        ("ab-set", "v1.1-hybrid", "v1.0-hybrid", "v1.0-hybrid"),
        ("promote", "v1.1-hybrid", "v1.1-hybrid", "v1.0-hybrid"),
        ("rollback", "v1.0-hybrid", "v1.0-hybrid", "v1.1-hybrid"),
    ]
    assert [e["traffic"] for e in state["history"]][3:7] == [0.1, 0.5, 1.0, 1.0]

    # v1.0-hybrid was the first active version: there is nothing before it
    message = assert_clean_failure(_invoke("rollback"), "no previous active calling_score")
    assert "v1.0-hybrid" in message
    listing = _ok("list").stdout
    assert "active v1.0-hybrid; A/B test: none" in listing
    assert re.search(r"v1\.1-hybrid\s+deprecated", listing)


def test_the_file_holds_the_apps_fields_metrics_sha_source_and_parity(grid_dir: Path) -> None:
    _ok("register", "--version", "v1", "--variant", LR_VARIANT, "--data-source", "synthetic")
    model = grid_dir / onnx_filename(LR_VARIANT)
    record = _calling_score()["versions"]["v1"]
    assert list(record)[:11] == [
        "version",
        "modelPath",
        "defaultWeight",
        "dataSource",
        "trainedDate",
        "status",
        "description",
        "trainingMetrics",
        "abTestTrafficPercentage",
        "abTestStartDate",
        "performanceMetrics",
    ]
    assert record["modelPath"] == f"assets/models/optimized/{onnx_filename(LR_VARIANT)}"
    assert record["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    metadata = read_metadata(model)
    metrics = json.loads(metadata["metrics"])
    results = json.loads((grid_dir / RESULTS_FILENAME).read_text())
    entry = next(v for v in results["variants"] if v["name"] == LR_VARIANT)
    assert record["trainingMetrics"]["test_loss"] == metrics["test_loss"]
    assert record["trainingMetrics"]["val_loss"] == metrics["val_loss"]
    assert record["trainingMetrics"]["improvement_vs_baseline"] == pytest.approx(
        entry["improvement_vs_baseline_pct"]
    )
    assert record["source"] == {
        "kind": "grid_variant",
        "variant": LR_VARIANT,
        "grid_dir": "assets/models/optimized",
        "study": STUDY,
        "data_fingerprint": metadata["data_fingerprint"],
        "trial_number": entry["trial_numbers"][0],
    }
    assert record["parity"]["export_max_abs_diff"] == entry["parity_max_abs_diff"]
    low, high = record["parity"]["smoke_output_range"]
    assert 0 <= low <= high <= 1
    assert "lr=0.0001" in record["description"]
    assert "worse than the baseline" in record["description"]  # 2 epochs at lr 1e-4: worse
    assert _document()["schema_version"] == 1


def test_register_any_model_file_and_a_stored_trial(grid_run: Path, tmp_path: Path) -> None:
    outside = grid_run / "optimized" / onnx_filename(BASELINE)  # absolute, outside the cwd
    _ok("register", "--version", "file", "--model", outside, "--data-source", "real_data")
    record = _calling_score()["versions"]["file"]
    assert record["modelPath"] == outside.as_posix()
    assert record["source"]["kind"] == "file"
    assert record["source"]["variant"] == BASELINE

    storage = f"sqlite:///{grid_run}/studies/g.db"
    trial = int(read_metadata(grid_run / "optimized" / onnx_filename(LR_VARIANT))["trial_number"])
    result = _ok(
        "register",
        "--version",
        "from-trial",
        "--trial",
        str(trial),
        "--study",
        STUDY,
        "--storage",
        storage,
        "--data-source",
        "synthetic",
    )
    folder = tmp_path / "assets/models/versions/calling_score/from-trial"
    model = folder / onnx_filename(LR_VARIANT)
    assert model.is_file(), result.output
    record = _calling_score()["versions"]["from-trial"]
    assert record["modelPath"] == model.relative_to(tmp_path).as_posix()
    assert record["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert record["source"]["kind"] == "study_trial"
    assert record["source"]["trial_number"] == trial
    assert record["source"]["storage"] == storage
    assert record["parity"]["export_max_abs_diff"] < 1e-5
    results = json.loads((folder / RESULTS_FILENAME).read_text())
    assert results["variants"][0]["onnx_path"] == str(
        Path("assets/models/versions/calling_score/from-trial") / model.name
    )
    staging = [p for p in (tmp_path / "assets/models/versions").iterdir() if p.name[0] == "."]
    assert staging == []  # the temporary export folder is gone


# --- refusals: one line, exit 2, the file unchanged ---------------------------------------------

STORAGE_MARK = "<grid storage>"
NEW_V2 = ["register", "--version", "v2", "--data-source", "synthetic"]
REFUSALS: list[tuple[list[str], str]] = [
    (["show", "nope"], "no calling_score version 'nope'"),
    (["promote", "nope"], "(versions: v0.9, v1.0-hybrid, v1.1-hybrid, v1.2)"),
    (["ab-set", "v1.1-hybrid", "--traffic", "0"], "--traffic must be in (0, 1]"),
    (["ab-set", "v1.1-hybrid", "--traffic", "1.5"], "got 1.5"),
    (["ab-set", "v1.1-hybrid", "--traffic", "-0.1"], "--traffic must be in (0, 1]"),
    (["ab-set", "v1.1-hybrid", "--traffic", "nan"], "got nan"),
    (["ab-set", "v1.1-hybrid", "--traffic", "10"], "for 10% write 0.1"),
    (["ab-start", "v1.2", "--min-effect", "0"], "--min-effect must be a positive number"),
    (["ab-start", "v1.2", "--traffic", "0.1"], "an A/B test of 'v1.1-hybrid'"),
    (["ab-start", "v1.1-hybrid", "--traffic", "0.2"], "change its traffic with ab-set"),
    (["ab-set", "v1.2", "--traffic", "0.2"], "is of 'v1.1-hybrid', not 'v1.2'"),
    (["ab-stop", "v1.2"], "is of 'v1.1-hybrid', not 'v1.2'"),
    (["ab-stop", "nope"], "no calling_score version 'nope'"),
    (["archive", "v1.0-hybrid"], "is the active calling_score version and cannot be archived"),
    (["archive", "v1.1-hybrid"], "is in a running A/B test"),
    (["archive", "v0.9"], "already archived"),
    (["promote", "v0.9"], "archived versions are never served again"),
    (["promote", "v1.0-hybrid"], "already the active"),
    (["promote", "v1.2"], "an A/B test of 'v1.1-hybrid' is running"),
    (["rollback"], "an A/B test of 'v1.1-hybrid' is running"),
    (["rollback", "--model-type", "outcome"], "no active outcome version"),
    (["route", "--user-id", ""], "--user-id must not be empty"),
    (["route", "--user-id", "u", "--model-type", "outcome"], "no active outcome version"),
    (["list", "--model-type", "nope"], "--model-type must be one of calling_score, outcome"),
    (["ab-start", "v1.1-hybrid", "--model-type", "outcome"], "no outcome version"),
    (["ab-report", "--outcomes", "missing.csv"], "no such outcomes file"),
    (["ab-report", "--outcomes", "x.csv", "--candidate", "v1.2"], "pass --traffic"),
    (
        [
            "register",
            "--version",
            "v1.1-hybrid",
            "--variant",
            BASELINE,
            "--data-source",
            "real_data",
        ],
        "is already registered",
    ),
    (
        ["register", "--version", "v2", "--variant", BASELINE, "--data-source", "hybrid"],
        "--data-source must be one of synthetic, hybrid_big_five, real_data",
    ),
    ([*NEW_V2, "--variant", BASELINE, "--default-weight", "1.5"], "--default-weight must be in"),
    (
        ["register", "--version", "../v2", "--variant", BASELINE, "--data-source", "synthetic"],
        "--version must be 1-64 letters",
    ),
    (NEW_V2, "exactly one of --model PATH, --trial N, --variant NAME"),
    ([*NEW_V2, "--variant", BASELINE, "--model", "broken.onnx"], "exactly one of"),
    (
        [*NEW_V2, "--variant", "nope"],
        f"(variants in assets/models/optimized: {BASELINE}, {LR_VARIANT})",
    ),
    ([*NEW_V2, "--model", "missing.onnx"], "missing.onnx: no such model file"),
    (
        [*NEW_V2, "--model", "broken.onnx"],
        "breaks the app's ONNX contract (docs/contract.md): output must be [N]",
    ),
    (
        [*NEW_V2, "--variant", BASELINE, "--model-type", "outcome"],
        "its metadata says model_type 'calling_score'",
    ),
    ([*NEW_V2, "--trial", "0", "--study", "nope", "--storage", STORAGE_MARK], "no study 'nope'"),
    ([*NEW_V2, "--trial", "99", "--study", STUDY, "--storage", STORAGE_MARK], "has no trial 99"),
]


@pytest.mark.parametrize(("args", "fragment"), REFUSALS, ids=[" ".join(a) for a, _ in REFUSALS])
def test_every_refusal_is_one_line_and_leaves_the_file_byte_identical(
    mid_test: Path, grid_run: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
    storage = f"sqlite:///{grid_run}/studies/g.db"
    args = [storage if a == STORAGE_MARK else a for a in args]
    before = mid_test.read_bytes()
    (tmp_path / "x.csv").write_text("user_id,version,outcome\nu,v1.2,1\n")
    assert_clean_failure(_invoke(*args), fragment)
    assert mid_test.read_bytes() == before
    assert not (tmp_path / "assets/models/versions").exists()  # no export was left behind


def test_promote_needs_an_ab_test_unless_told_otherwise(mid_test: Path) -> None:
    _ok("ab-stop", "v1.1-hybrid")
    before = mid_test.read_bytes()
    assert_clean_failure(
        _invoke("promote", "v1.2"),
        "'v1.2' has not been A/B tested against the active 'v1.0-hybrid'",
        "cso registry ab-start v1.2 --traffic 0.1",
    )
    assert mid_test.read_bytes() == before
    _ok("promote", "v1.2", "--without-ab-test")
    assert _calling_score()["active"] == "v1.2"
    assert _calling_score()["versions"]["v1.1-hybrid"]["status"] == "staging"  # test stopped


def test_ab_stop_returns_everyone_to_the_active_version(mid_test: Path) -> None:
    result = _ok("ab-stop", "v1.1-hybrid")
    assert "every user gets v1.0-hybrid" in result.stdout
    state = _calling_score()
    assert state["ab_test"] is None
    assert state["versions"]["v1.1-hybrid"]["abTestTrafficPercentage"] is None
    assert state["versions"]["v1.1-hybrid"]["status"] == "staging"
    assert all(
        _ok("route", "--user-id", f"u{i}").stdout.startswith(f"u{i} -> v1.0-hybrid")
        for i in range(10)
    )


def test_rollback_walks_back_through_the_history(mid_test: Path) -> None:
    _ok("promote", "v1.1-hybrid")  # ends the test; v1.0-hybrid deprecated
    _ok("promote", "v1.2", "--without-ab-test")
    assert _ok("rollback").stdout.strip().endswith("v1.2 -> v1.1-hybrid")
    assert _ok("rollback").stdout.strip().endswith("v1.1-hybrid -> v1.0-hybrid")
    # before v1.0-hybrid came v0.9, which is archived: never served again
    before = mid_test.read_bytes()
    assert_clean_failure(_invoke("rollback"), "the previous active version 'v0.9' is archived")
    assert mid_test.read_bytes() == before
    assert _calling_score()["active"] == "v1.0-hybrid"


def test_a_changed_or_missing_model_file_is_never_served(mid_test: Path, tmp_path: Path) -> None:
    model = tmp_path / GRID_DIR / onnx_filename(LR_VARIANT)
    model.write_bytes(model.read_bytes() + b"\0")
    assert re.search(r"v1\.2\s.*changed", _ok("list").stdout)
    _ok("ab-stop", "v1.1-hybrid")
    before = mid_test.read_bytes()
    assert_clean_failure(
        _invoke("ab-start", "v1.2", "--traffic", "0.1"), "has changed since it was registered"
    )
    model.unlink()
    assert re.search(r"v1\.2\s.*missing", _ok("list").stdout)
    assert_clean_failure(
        _invoke("promote", "v1.1-hybrid", "--without-ab-test"), "is missing; restore it"
    )
    assert mid_test.read_bytes() == before
    assert "file: missing" in _ok("show", "v1.2").stdout
    shown = _ok("show", "v1.0-hybrid").stdout
    assert "file: ok" in shown  # the baseline's file was not touched
    record = json.loads(shown[shown.index("{") : shown.rindex("}") + 1])
    assert record == _calling_score()["versions"]["v1.0-hybrid"]
    assert re.search(r"promote v1\.0-hybrid \(active: v1\.0-hybrid\)", shown)


# --- the file: hand edits, crashes, locks, concurrency ------------------------------------------


def _edit(document: dict[str, Any], change: str) -> None:
    state = document["model_types"]["calling_score"]
    v11 = state["versions"]["v1.1-hybrid"]
    if change == "two active":
        state["versions"]["v1.2"]["status"] = "active"
    elif change == "active unknown":
        state["active"] = "v9"
    elif change == "traffic 2":
        state["ab_test"]["traffic"] = 2
    elif change == "traffic mismatch":
        v11["abTestTrafficPercentage"] = 0.5
    elif change == "weight text":
        v11["defaultWeight"] = "0.1"
    elif change == "bad status":
        v11["status"] = "live"
    elif change == "bad source":
        v11["dataSource"] = "csv"
    elif change == "key mismatch":
        v11["version"] = "v1.1"
    elif change == "bad sha":
        v11["sha256"] = "abc"
    elif change == "no model path":
        del v11["modelPath"]
    elif change == "candidate archived":
        v11["status"] = "archived"
    elif change == "versions list":
        state["versions"] = []
    elif change == "history object":
        state["history"] = {}
    elif change == "bad event":
        state["history"][0]["event"] = "deploy"
    elif change == "unknown type":
        document["model_types"]["ranking"] = {}
    elif change == "newer schema":
        document["schema_version"] = 2
    elif change == "no schema":
        del document["schema_version"]


HAND_EDITS = [
    ("two active", "model_types.calling_score.active must be the one version whose status"),
    ("active unknown", "model_types.calling_score.active must name a registered version"),
    ("traffic 2", "ab_test.traffic must be a number in (0, 1], got 2"),
    ("traffic mismatch", "abTestTrafficPercentage must be the running A/B test's traffic"),
    ("weight text", "versions.v1.1-hybrid.defaultWeight must be a number in [0, 1], got '0.1'"),
    ("bad status", "status must be one of staging, active, deprecated, archived, got 'live'"),
    ("bad source", "dataSource must be one of synthetic, hybrid_big_five, real_data"),
    ("key mismatch", "version must equal its key 'v1.1-hybrid'"),
    ("bad sha", "sha256 must be 64 lowercase hex digits"),
    ("no model path", "modelPath must be a non-empty string, got None"),
    ("candidate archived", "ab_test.candidate must name a registered staging version"),
    ("versions list", "model_types.calling_score.versions must be a JSON object, got []"),
    ("history object", "history must be a JSON list"),
    ("bad event", "history[0].event must be one of register"),
    ("unknown type", "model_types.ranking is not a model type"),
    ("newer schema", "written by a newer cso"),
    ("no schema", "schema_version must be 1, got None"),
]


@pytest.mark.parametrize(("change", "fragment"), HAND_EDITS, ids=[c for c, _ in HAND_EDITS])
def test_a_hand_edited_registry_is_one_clear_error(
    mid_test: Path, change: str, fragment: str
) -> None:
    document = _document()
    _edit(document, change)
    mid_test.write_text(json.dumps(document))
    before = mid_test.read_bytes()
    for args in (
        ("list",),
        ("route", "--user-id", "u"),
        ("ab-set", "v1.1-hybrid", "--traffic", "0.2"),
    ):
        message = assert_clean_failure(_invoke(*args), fragment)
        assert message.startswith(f"error: {REGISTRY}: ")
    assert mid_test.read_bytes() == before
    with pytest.raises(RegistryError, match=re.escape(fragment)):
        load_registry(REGISTRY)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not valid JSON (line 1, column 2"),
        ("", "not valid JSON (line 1, column 1"),
        ("[]", "must hold a JSON object, got []"),
        ('{"schema_version": 1, "model_types": 3}', "model_types must be a JSON object"),
        ('{"schema_version": 1, "model_types": {"outcome": null}}', "model_types.outcome must be"),
        ('{"schema_version": 1e400}', "not valid JSON (the number 1e400 is out of range)"),
        ('{"schema_version": NaN}', "not valid JSON (NaN is not a JSON number)"),
    ],
)
def test_a_nonsense_registry_file_is_one_clear_error(
    tmp_path: Path, text: str, fragment: str
) -> None:
    REGISTRY.parent.mkdir(parents=True)
    REGISTRY.write_text(text)
    assert_clean_failure(_invoke("list"), fragment)
    assert REGISTRY.read_text() == text
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    assert_clean_failure(_invoke("list", "--registry", binary), "cannot read the registry")


def test_a_registry_nested_100000_levels_deep_is_one_clear_error() -> None:
    REGISTRY.parent.mkdir(parents=True)
    text = "[" * 100_000 + "]" * 100_000
    REGISTRY.write_text(text)
    for args in (("list",), ("ab-set", "v1", "--traffic", "0.5")):
        assert_clean_failure(_invoke(*args), f"nested more than {MAX_DEPTH} levels deep")
    assert REGISTRY.read_text() == text
    # deep enough to parse, too deep to trust: refused the same way
    document = {"schema_version": 1, "model_types": {}, "x": json.loads("[" * 80 + "]" * 80)}
    REGISTRY.write_text(json.dumps(document))
    assert_clean_failure(_invoke("list"), "nested more than 64 levels deep")


def test_a_deeply_nested_results_file_beside_a_model_only_means_fewer_metrics(
    grid_dir: Path,
) -> None:
    (grid_dir / RESULTS_FILENAME).write_text("[" * 100_000 + "]" * 100_000)
    _ok("register", "--version", "v1", "--variant", LR_VARIANT, "--data-source", "synthetic")
    record = _calling_score()["versions"]["v1"]
    assert "improvement_vs_baseline" not in record["trainingMetrics"]
    assert "test_loss" in record["trainingMetrics"]  # from the model's own metadata


PASSWORD = "s3cret-pw"
SECRET_URL = f"postgresql://cso:{PASSWORD}@db.example:5432/cso"


def _files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_storage_password_never_reaches_the_registry_or_the_output(
    grid_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Register from a study whose --storage URL holds a password; grep every file and line.

    The study is the grid's SQLite one, reached through the PostgreSQL-looking URL (no server
    needed); its artifacts sit where cso looks for a non-SQLite storage's.
    """
    assert trial_source("s", SECRET_URL, 3)["storage"] == "postgresql://cso:***@db.example:5432/cso"
    real_load = trials_module.load_study
    sqlite = f"sqlite:///{grid_run}/studies/g.db"
    monkeypatch.setattr(
        trials_module,
        "load_study",
        lambda url, name: real_load(sqlite if url == SECRET_URL else url, name),
    )
    shutil.copytree(grid_run / "studies/g.artifacts", tmp_path / f"studies/{STUDY}.artifacts")
    trial = int(read_metadata(grid_run / "optimized" / onnx_filename(LR_VARIANT))["trial_number"])
    register = ["register", "--trial", trial, "--study", STUDY, "--storage", SECRET_URL]
    result = _ok(*register, "--version", "v1", "--data-source", "synthetic")
    assert PASSWORD not in result.output
    assert (
        _calling_score()["versions"]["v1"]["source"]["storage"]
        == trial_source(STUDY, SECRET_URL, trial)["storage"]
    )
    assert (tmp_path / "assets/models/versions/calling_score/v1").is_dir()
    assert _files_holding(tmp_path / "assets", PASSWORD) == []
    shown = _ok("show", "v1").stdout
    assert "cso:***@db.example" in shown and PASSWORD not in shown

    # an error that names the storage (as load_study's do) is printed without the password
    def refuse(url: str, name: str) -> Any:
        raise StudyError(f"no study '{name}' in {url} (studies there: none)")

    monkeypatch.setattr(trials_module, "load_study", refuse)
    before = REGISTRY.read_bytes()
    message = assert_clean_failure(
        _invoke(*register, "--version", "v2", "--data-source", "synthetic"), "no study"
    )
    assert PASSWORD not in message and "cso:***@db.example" in message
    assert REGISTRY.read_bytes() == before


def test_a_password_an_older_cso_recorded_is_masked_and_scrubbed(mid_test: Path) -> None:
    document = _document()
    document["model_types"]["calling_score"]["versions"]["v1.2"]["source"]["storage"] = SECRET_URL
    mid_test.write_text(json.dumps(document))
    assert PASSWORD not in _ok("show", "v1.2").stdout
    _ok("archive", "v1.2")
    assert PASSWORD not in mid_test.read_text()


def test_a_real_postgresql_url_stays_out_of_errors() -> None:
    url = postgres_url_or_skip()
    from calling_score_opt.study import redact_url

    secret = url.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
    result = _invoke(*NEW_V2, "--trial", "0", "--study", "no-such-study", "--storage", url)
    assert_clean_failure(result, "no study 'no-such-study'")
    if secret:
        assert secret not in result.output and redact_url(url) != url


def test_keys_the_app_added_survive_an_update(mid_test: Path) -> None:
    document = _document()
    document["model_types"]["calling_score"]["versions"]["v1.2"]["appNotes"] = {"owner": "ana"}
    mid_test.write_text(json.dumps(document))
    _ok("archive", "v1.2")
    assert _calling_score()["versions"]["v1.2"]["appNotes"] == {"owner": "ana"}


def test_a_crash_while_writing_leaves_the_old_file(
    mid_test: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = mid_test.read_bytes()
    original = Path.write_text

    def crash_half_way(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        original(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", crash_half_way)
    result = _invoke("ab-set", "v1.1-hybrid", "--traffic", "0.5")
    monkeypatch.undo()
    assert_clean_failure(result, "cannot write the registry", "No space left", "it is unchanged")
    assert mid_test.read_bytes() == before
    assert sorted(p.name for p in mid_test.parent.iterdir() if p.is_file()) == [
        "registry.json",
        "registry.json.lock",
    ]


def test_a_held_lock_is_a_clean_error_not_a_hang(
    mid_test: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock_module, "LOCK_TIMEOUT_S", 0.2)
    before = mid_test.read_bytes()
    with FileLock(f"{mid_test}.lock"):
        assert_clean_failure(
            _invoke("ab-set", "v1.1-hybrid", "--traffic", "0.5"),
            "registry.json.lock: another cso registry command has held the lock",
        )
    assert mid_test.read_bytes() == before
    _ok("ab-set", "v1.1-hybrid", "--traffic", "0.5")  # and it works once the lock is free


CONCURRENT = 20
_FORK_REGISTERS = textwrap.dedent(
    """
    import os, sys
    import calling_score_opt.export, onnxruntime  # imported once, before the fork
    from calling_score_opt.registry_cli import registry_app

    model, registry, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    read_end, write_end = os.pipe()
    children = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            os.close(write_end)
            os.read(read_end, 1)  # every child waits here until all exist, then all go at once
            args = ["register", "--version", f"v{i}", "--model", model,
                    "--data-source", "synthetic", "--registry", registry]
            try:
                registry_app(args, prog_name="cso registry")
            except SystemExit as exc:
                os._exit(exc.code if isinstance(exc.code, int) else 1)
            os._exit(0)
        children.append(pid)
    os.close(read_end)
    os.close(write_end)  # end of file for every child: go
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    print(codes)
    sys.exit(max(codes))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_concurrent_register_processes_lose_no_update(grid_dir: Path, tmp_path: Path) -> None:
    """20 processes register at the same moment; each must find its version in the file.

    The processes are forked from one that has already imported torch and onnxruntime, so
    they start together instead of one after another (an interpreter start costs seconds).
    """
    model = grid_dir / onnx_filename(BASELINE)
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_REGISTERS, str(model), str(REGISTRY), str(CONCURRENT)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = _calling_score()
    assert sorted(state["versions"]) == sorted(f"v{i}" for i in range(CONCURRENT))
    assert len(state["history"]) == CONCURRENT
    assert {e["version"] for e in state["history"]} == set(state["versions"])
    leftovers = [p.name for p in REGISTRY.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# --- deciding from outcomes (the statistics: tests/test_registry_ab.py) --------------------


def _simulate(n_users: int, traffic: float, effect: float, seed: int = 0) -> list[Outcome]:
    """Outcomes of users routed by the real rule: the candidate adds ``effect`` to the mean."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_users):
        user = f"user_{i}"
        candidate = gets_candidate(SALT, user, traffic)
        value = 0.5 + (effect if candidate else 0.0) + rng.gauss(0, 0.2)
        rows.append(Outcome(user, "v1.1-hybrid" if candidate else "v1.0-hybrid", value))
    return rows


def test_ab_report_from_a_csv_prints_and_saves(mid_test: Path, tmp_path: Path) -> None:
    path = tmp_path / "outcomes.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "version", "outcome", "note"])
        for row in _simulate(6000, 0.1, 0.05):
            writer.writerow([row.user_id, row.version, f"{row.outcome:.6f}", "x"])
    result = _ok("ab-report", "--outcomes", path, "--save")
    out = result.stdout
    assert re.search(r"v1\.0-hybrid[\s│]+active[\s│]+5,\d{3}[\s│]+5,\d{3}[\s│]+0\.50", out), out
    assert "Difference (candidate - active): +0.0" in out
    assert re.search(r"Welch t 95% interval, one look: \[\+0\.0\d+, \+0\.0\d+\], df \d+", out)
    assert "Assignment: 0 of 6,000 users" in out and "at any share of the test" in out
    assert re.search(r"Split: users per routing band .*: ok", out), out
    assert "Recommendation: promote: the candidate is better" in out
    assert "cso registry ab-set v1.1-hybrid --traffic 0.5" in out
    saved = _calling_score()["versions"]["v1.1-hybrid"]["performanceMetrics"]["ab_report"]
    assert saved["recommendation"] == "promote"
    assert saved["against"] == "v1.0-hybrid"
    assert saved["always_valid_ci95"][0] > 0
    assert saved["welch_df"] > 100

    _ok("ab-set", "v1.1-hybrid", "--traffic", "1")
    assert_clean_failure(_invoke("ab-report", "--outcomes", path), "there is no control group")


def test_ab_start_fixes_the_smallest_effect_worth_shipping(mid_test: Path) -> None:
    _ok("ab-stop", "v1.1-hybrid")
    out = _ok("ab-start", "v1.2", "--traffic", "0.1", "--min-effect", "0.02").stdout
    assert "smallest effect worth shipping 0.02" in out
    state = _calling_score()
    assert state["ab_test"]["min_effect"] == 0.02
    start = state["history"][-1]
    assert (start["event"], start["min_effect"]) == ("ab-start", 0.02)
    assert start["salt"] == state["ab_test"]["salt"]  # a stopped test can still be routed
    assert load_registry(REGISTRY).of("calling_score").ab_test.min_effect == 0.02  # type: ignore[union-attr]


# --- help and docs -----------------------------------------------------------------------------

COMMANDS = sorted(typer.main.get_command(registry_app).commands)  # type: ignore[attr-defined]
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example_and_is_documented(command: str) -> None:
    result = _ok(command, "--help")
    assert f"Example: cso registry {command}" in result.stdout
    assert f"cso registry {command}" in (DOCS / "registry.md").read_text()


def test_all_the_commands_of_the_issue_exist() -> None:
    assert set(COMMANDS) == {
        "register",
        "list",
        "show",
        "ab-start",
        "ab-set",
        "ab-stop",
        "route",
        "ab-report",
        "promote",
        "rollback",
        "archive",
    }


def test_cso_registry_is_mounted(run_cli: Cli) -> None:
    result = run_cli("registry", "--help")
    assert result.exit_code == 0, result.output
    assert "ab-start" in result.stdout
