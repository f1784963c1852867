"""Registering: a checked model file becomes a new staging version, with where it came from.

Four sources share one path: a file (``--model``), a grid variant (``--variant``), a stored
trial exported on the spot (``--trial``) and a study's ensemble built on the spot
(``--ensemble``). Each builds its ``source`` record and calls :func:`add_version`, the one place
a version is added (the seam for further sources), which checks under the registry's lock that
the model takes the active version's inputs (:mod:`.featurespec`).
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from calling_score_opt.atomic import write_text_atomic
from calling_score_opt.registry.featurespec import check_feature_spec, feature_spec
from calling_score_opt.registry.fileformat import load_registry
from calling_score_opt.registry.inspection import (
    PARITY_REFERENCE,
    InspectedModel,
    default_description,
    inspect_model,
    json_value,
    stored_path,
)
from calling_score_opt.registry.lock import update_registry
from calling_score_opt.registry.records import (
    DEFAULT_VERSIONS_DIR,
    DEFAULT_WEIGHT,
    HistoryEvent,
    ModelVersion,
    Registry,
    RegistryError,
    check_data_source,
    check_default_weight,
    check_model_type,
    check_version_name,
    utc_now,
)
from calling_score_opt.study import passwords_hidden


@dataclass(frozen=True)
class Registration:
    """What ``cso registry register`` was asked to record, besides the model file.

    ``new_feature_spec`` is why the model may take other inputs than the active version
    (``--new-feature-spec REASON``); without it such a model is refused.
    """

    version: str
    data_source: str
    model_type: str = "calling_score"
    default_weight: float = DEFAULT_WEIGHT
    description: str | None = None
    new_feature_spec: str | None = None

    def __post_init__(self) -> None:
        check_version_name(self.version)
        check_data_source(self.data_source)
        check_model_type(self.model_type)
        check_default_weight(self.default_weight)
        if self.new_feature_spec is not None and not self.new_feature_spec.strip():
            raise RegistryError(
                "--new-feature-spec needs a reason, recorded with the version: say why its "
                'inputs change (e.g. --new-feature-spec "app 2.4 adds weather features")'
            )


def refuse_existing(registry: Registry, registration: Registration) -> None:
    """Versions are never overwritten: refuse a name the model type already has."""
    state = registry.of(registration.model_type)
    if registration.version in state.versions:
        record = state.versions[registration.version]
        raise RegistryError(
            f"{registration.model_type} version '{registration.version}' is already registered "
            f"({record.status}, {record.model_path}); versions are never overwritten: choose a "
            "new --version"
        )


def add_version(
    registry_path: Path,
    registration: Registration,
    inspected: InspectedModel,
    model_path: Path,
    source: dict[str, Any],
    trained_date: str | None = None,
    staged_dir: Path | None = None,
    final_dir: Path | None = None,
) -> ModelVersion:
    """Record a checked model as a new staging version (under the lock).

    ``source`` says where it came from (it must hold no secret: storage URLs go through
    :func:`calling_score_opt.study.redact_url`). ``staged_dir`` (an export made for this version)
    is renamed to ``final_dir`` only once the version is known to be new and to take the active
    version's inputs (or ``registration.new_feature_spec`` says why not), inside the lock.

    Raises:
        RegistryError: the version exists, or the model's feature spec differs from the active
            version's (or cannot be compared) without a ``new_feature_spec`` reason.
    """
    metadata = inspected.metadata
    for key in ("variant", "study", "data_fingerprint"):
        if key in metadata and key not in source:
            source[key] = metadata[key]
    if "trial_number" in metadata and "trial_number" not in source:
        number = json_value(metadata, "trial_number")
        source["trial_number"] = number if isinstance(number, int) else metadata["trial_number"]
    record = ModelVersion(
        version=registration.version,
        model_path=stored_path(model_path),
        default_weight=registration.default_weight,
        data_source=registration.data_source,
        status="staging",
        sha256=inspected.sha256,
        trained_date=trained_date or inspected.trained_date,
        description=registration.description
        if registration.description is not None
        else default_description(inspected),
        training_metrics=dict(inspected.training_metrics),
        source=source,
        parity=dict(inspected.parity),
    )
    spec = feature_spec(metadata)
    record.feature_spec_hash = spec.hash
    moved = False
    try:
        with update_registry(registry_path) as registry:
            refuse_existing(registry, registration)
            record.feature_spec_change = check_feature_spec(
                registry.of(registration.model_type),
                spec,
                model_path.name,
                registration.new_feature_spec,
            )
            if staged_dir is not None and final_dir is not None:
                if final_dir.exists():
                    raise RegistryError(
                        f"{final_dir} already exists but is no registered version; move it "
                        "away or choose another --version"
                    )
                final_dir.parent.mkdir(parents=True, exist_ok=True)
                staged_dir.rename(final_dir)
                moved = True
            state = registry.of(registration.model_type)
            state.versions[record.version] = record
            state.history.append(
                HistoryEvent(utc_now(), "register", record.version, state.active, state.active)
            )
    except BaseException:
        if moved and staged_dir is not None and final_dir is not None:
            final_dir.rename(staged_dir)  # not registered after all: the caller removes it
        raise
    return record


def register_model(
    registry_path: Path, registration: Registration, model_path: Path
) -> ModelVersion:
    """Register any ONNX file that obeys the contract (``--model PATH``) as a staging version."""
    refuse_existing(load_registry(registry_path), registration)
    inspected = inspect_model(model_path, registration.model_type)
    source: dict[str, Any] = {"kind": "file", "path": stored_path(model_path)}
    return add_version(registry_path, registration, inspected, model_path, source)


def register_variant(
    registry_path: Path, registration: Registration, variant: str, grid_dir: Path
) -> ModelVersion:
    """Register a grid variant's ONNX file (``--variant NAME``) as a staging version."""
    from calling_score_opt.grid import onnx_filename

    refuse_existing(load_registry(registry_path), registration)
    model_path = grid_dir / onnx_filename(variant)
    if not model_path.is_file():
        found = sorted(
            p.name.removeprefix("calling_score_model_").removesuffix(".onnx")
            for p in grid_dir.glob("calling_score_model_*.onnx")
        )
        raise RegistryError(
            f"{model_path}: no such model file (variants in {grid_dir}: "
            f"{', '.join(found) or 'none'}); run cso grid or pass --grid-dir"
        )
    inspected = inspect_model(model_path, registration.model_type)
    if inspected.variant is not None and inspected.variant != variant:
        raise RegistryError(
            f"{model_path}: its metadata names variant '{inspected.variant}', not '{variant}'"
        )
    source: dict[str, Any] = {
        "kind": "grid_variant",
        "variant": variant,
        "grid_dir": stored_path(grid_dir),
    }
    return add_version(registry_path, registration, inspected, model_path, source)


def trial_source(study_name: str, storage_url: str, trial: int) -> dict[str, Any]:
    """The ``source`` of a version exported from a stored trial: the storage URL without its
    password (the registry is read by the app and kept in version control)."""
    from calling_score_opt.study import redact_url

    return {
        "kind": "study_trial",
        "study": study_name,
        "storage": redact_url(storage_url),
        "trial_number": trial,
    }


def register_trial(
    registry_path: Path,
    registration: Registration,
    trial: int,
    study_name: str,
    storage_url: str,
    versions_dir: Path = DEFAULT_VERSIONS_DIR,
) -> ModelVersion:
    """Export a stored trial (``--trial N``) into ``<versions_dir>/<model_type>/<version>/``
    and register it as a staging version.

    The export is the verified one of ``cso export`` (parity against PyTorch on the study's
    test split); it goes to a temporary folder first, so a refused registration leaves nothing.
    Neither the registry nor the exported results file keeps the storage URL's password.
    """
    from calling_score_opt.trials import export_trials, select_trials

    def export(study: Any, staged_dir: Path) -> tuple[dict[str, Any], Path, dict[str, Any]]:
        chosen = select_trials(study, number=trial)
        exported = export_trials(study, chosen, staged_dir, storage_url)
        completed = chosen[0].datetime_complete
        trained = completed.astimezone(UTC).isoformat(timespec="seconds") if completed else None
        return exported.results, exported.results_path, {**exported.entries[0], "_at": trained}

    return _register_from_study(
        registry_path,
        registration,
        study_name,
        storage_url,
        versions_dir,
        export,
        trial_source(study_name, storage_url, trial),
    )


def register_ensemble(
    registry_path: Path,
    registration: Registration,
    study_name: str,
    storage_url: str,
    versions_dir: Path = DEFAULT_VERSIONS_DIR,
    max_members: int | None = None,
) -> ModelVersion:
    """Build the best ensemble of a study's complete trials (as ``cso export --ensemble``) into
    ``<versions_dir>/<model_type>/<version>/`` and register it as a staging version.

    The ensemble is selected afresh from the study's stored trials (deterministic: the same
    trials give the same members and weights) and recorded in the study, like every export.
    """
    from calling_score_opt.ensemble import DEFAULT_MAX_MEMBERS, build_ensemble
    from calling_score_opt.study import redact_url

    members: list[dict[str, Any]] = []

    def export(study: Any, staged_dir: Path) -> tuple[dict[str, Any], Path, dict[str, Any]]:
        built = build_ensemble(
            study,
            staged_dir,
            storage_url,
            max_members=max_members or DEFAULT_MAX_MEMBERS,
            final_dir=versions_dir / registration.model_type / registration.version,
        )
        members.extend(built.record["members"])
        (entry,) = [v for v in built.results["variants"] if v.get("kind") == "ensemble"]
        return built.results, built.results_path, {**entry, "_at": None}

    source: dict[str, Any] = {
        "kind": "study_ensemble",
        "study": study_name,
        "storage": redact_url(storage_url),
        "members": members,  # filled in by the export, before the version is written
    }
    return _register_from_study(
        registry_path, registration, study_name, storage_url, versions_dir, export, source
    )


ExportToStaging = Callable[[Any, Path], tuple[dict[str, Any], Path, dict[str, Any]]]


def _register_from_study(
    registry_path: Path,
    registration: Registration,
    study_name: str,
    storage_url: str,
    versions_dir: Path,
    export: ExportToStaging,
    source: dict[str, Any],
) -> ModelVersion:
    """Export from a study into a staging folder, check the model, and register it; the
    staging folder becomes ``<versions_dir>/<model_type>/<version>/`` only on success."""
    from calling_score_opt.trials import load_study

    refuse_existing(load_registry(registry_path), registration)
    final_dir = versions_dir / registration.model_type / registration.version
    if final_dir.exists():
        raise RegistryError(
            f"{final_dir} already exists but is no registered version; move it away or choose "
            "another --version"
        )
    with passwords_hidden(storage_url):
        study = load_study(storage_url, study_name)
    staged_dir = versions_dir / f".staging-{registration.version}-{secrets.token_hex(4)}"
    try:
        with passwords_hidden(storage_url):
            results, results_path, entry = export(study, staged_dir)
        staged_model = Path(entry["onnx_path"])
        inspected = inspect_model(staged_model, registration.model_type)
        parity = {
            **inspected.parity,
            "export_max_abs_diff": entry["parity_max_abs_diff"],
            "export_checked_against": PARITY_REFERENCE,
        }
        inspected = InspectedModel(
            path=inspected.path,
            sha256=inspected.sha256,
            metadata=inspected.metadata,
            training_metrics=inspected.training_metrics,
            parity=parity,
            trained_date=inspected.trained_date,
            variant=inspected.variant,
        )
        final_model = final_dir / staged_model.name
        for variant in results["variants"]:  # the results file moves with the model
            if variant.get("onnx_path"):
                variant["onnx_path"] = str(final_dir / Path(variant["onnx_path"]).name)
        write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")
        return add_version(
            registry_path,
            registration,
            inspected,
            final_model,
            source,
            trained_date=entry["_at"],
            staged_dir=staged_dir,
            final_dir=final_dir,
        )
    finally:
        shutil.rmtree(staged_dir, ignore_errors=True)  # gone already when it was registered
