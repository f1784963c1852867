"""The feature spec: which inputs, in which order, a model takes, checked against the active one.

The app has one feature builder per model type, and it feeds every version of that type the
same columns. A model trained on other inputs, or on the same ones in another order, still runs
and still scores in [0, 1]: nothing fails, it just scores the wrong features. So registration
compares a new model's spec with the active version's and refuses a difference unless told why
(``--new-feature-spec REASON``, recorded with the version).

A model exported by cso names its inputs (metadata ``feature_names``) and a hash of them and of
the rule for filling missing ones (``feature_spec_hash``,
:func:`calling_score_opt.export.feature_spec_hash`). Older exports have only the names: their
hash is computed from them. A model from elsewhere may have neither: its spec is unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calling_score_opt.registry.inspection import file_state, json_value
from calling_score_opt.registry.records import ModelTypeRegistry, ModelVersion, RegistryError

_HOW_TO_OVERRIDE = 'pass --new-feature-spec "REASON"'


@dataclass(frozen=True)
class FeatureSpec:
    """A model's inputs as its metadata states them.

    ``hash`` is the stated ``feature_spec_hash``, else the hash of ``names``; both are None
    when the metadata does not say (then nobody can tell which inputs the model expects).
    """

    hash: str | None
    names: tuple[str, ...] | None

    @property
    def known(self) -> bool:
        return self.hash is not None


def feature_spec(metadata: Mapping[str, str]) -> FeatureSpec:
    """The feature spec an ONNX model's metadata states (see the module docstring)."""
    from calling_score_opt.export import feature_spec_hash

    listed = json_value(metadata, "feature_names")
    names: tuple[str, ...] | None = None
    if isinstance(listed, list) and listed and all(isinstance(n, str) for n in listed):
        names = tuple(listed)
    stated = metadata.get("feature_spec_hash")
    if stated:
        return FeatureSpec(stated, names)
    return FeatureSpec(feature_spec_hash(names) if names is not None else None, names)


def short_hash(spec_hash: str | None) -> str:
    """A hash as messages and tables show it: ``sha256:`` and 12 hex digits, or ``unknown``."""
    if spec_hash is None:
        return "unknown"
    algorithm, _, digest = spec_hash.partition(":")
    return f"{algorithm}:{digest[:12]}" if digest else spec_hash[:19]


def check_feature_spec(
    state: ModelTypeRegistry, candidate: FeatureSpec, model_name: str, reason: str | None
) -> dict[str, Any] | None:
    """Check a new model's feature spec against the active version's, before it is recorded.

    Nothing to compare without an active version, and nothing to record when the specs match.
    When they differ, or either is unknown, or the active version's file cannot be read,
    registration is refused unless ``reason`` (``--new-feature-spec``) says why.

    Returns:
        The ``featureSpecChange`` to record with the new version (the reason, the active
        version, its hash and the new one), or None when nothing changes.

    Raises:
        RegistryError: the spec differs or cannot be compared, and no ``reason`` was given.
    """
    if state.active is None:
        return None
    active = state.versions[state.active]
    try:
        active_spec = _active_spec(active, model_name)
    except RegistryError:
        if reason is None:
            raise
        active_spec = FeatureSpec(active.feature_spec_hash, None)  # as recorded, if it was
    if _same(candidate, active_spec):
        return None
    if reason is None:
        raise RegistryError(
            f"{_difference(candidate, active_spec, model_name, active.version)}; the app "
            f"feeds every version the active version's inputs, so it would score the wrong "
            f"features: retrain it on them, or {_HOW_TO_OVERRIDE} if the app's feature builder "
            "changes with it"
        )
    return {
        "reason": reason.strip(),
        "activeVersion": active.version,
        "from": active_spec.hash,
        "to": candidate.hash,
    }


def _same(candidate: FeatureSpec, active: FeatureSpec) -> bool:
    """Both specs known and equal; where both name their inputs, the names must agree too
    (a stated hash is only what the metadata says: edited metadata could keep an old one)."""
    if not (candidate.known and active.known and candidate.hash == active.hash):
        return False
    return candidate.names is None or active.names is None or candidate.names == active.names


def _active_spec(active: ModelVersion, model_name: str) -> FeatureSpec:
    """The active version's spec, read from its model file (which must be the registered one)."""
    from calling_score_opt.export import read_metadata

    what = f"the active version {active.version}'s model file {active.model_path}"
    then = (
        f"so {model_name}'s inputs cannot be checked against it; restore it (the registry keeps "
        f"its sha256), or {_HOW_TO_OVERRIDE} to register without the check"
    )
    state = file_state(active)
    if state == "missing":
        raise RegistryError(f"{what} is missing, {then}")
    if state == "changed":
        raise RegistryError(
            f"{what} has changed since it was registered (its sha256 differs), {then}"
        )
    try:
        metadata = read_metadata(Path(active.model_path))
    except Exception as exc:  # onnx raises several unrelated types for unreadable files
        raise RegistryError(f"cannot read {what} ({type(exc).__name__}: {exc}), {then}") from None
    return feature_spec(metadata)


def _difference(
    candidate: FeatureSpec, active: FeatureSpec, model_name: str, active_version: str
) -> str:
    """What differs between two specs, in words: the first differing column when names are known."""
    if not candidate.known:
        return (
            f"cannot tell which inputs {model_name} was trained on (its metadata has no "
            f"feature_names), so it cannot be checked against the active version {active_version}"
        )
    if not active.known:
        return (
            f"cannot tell which inputs the active version {active_version} was trained on (its "
            f"model's metadata has no feature_names), so {model_name} cannot be checked against it"
        )
    if candidate.names is None or active.names is None:
        return (
            f"{model_name} takes other inputs than the active version {active_version} (feature "
            f"spec {short_hash(candidate.hash)} vs {short_hash(active.hash)})"
        )
    new, old = candidate.names, active.names
    if new == old:
        return (
            f"{model_name} takes the same {len(new)} inputs as the active version "
            f"{active_version} but fills them by another rule (feature spec "
            f"{short_hash(candidate.hash)} vs {short_hash(active.hash)})"
        )
    column = next(
        (i for i, (a, b) in enumerate(zip(new, old, strict=False)) if a != b),
        min(len(new), len(old)),
    )
    at = f"column {column}: {_name_at(new, column)} vs {_name_at(old, column)} in {active_version}"
    if len(new) != len(old):
        return (
            f"{model_name} takes {len(new)} inputs, the active version {active_version} "
            f"takes {len(old)} ({at})"
        )
    if sorted(new) == sorted(old):
        return (
            f"{model_name} takes its {len(new)} inputs in another order than the active "
            f"version {active_version} ({at})"
        )
    return f"{model_name} takes other inputs than the active version {active_version} ({at})"


def _name_at(names: tuple[str, ...], column: int) -> str:
    return names[column] if column < len(names) else "none"
