"""optimization_results.json: the one file per output folder that says what its models are.

``cso grid`` writes it for its variants; ``cso export`` (single trials and ensembles) merges into
it. A merge never drops what the file already holds: entries of other trials stay, an entry of
the same trial is updated, and a file that belongs to another study or other data is refused
rather than overwritten.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from calling_score_opt import __version__
from calling_score_opt.atomic import write_text_atomic
from calling_score_opt.data import Dataset, Split
from calling_score_opt.errors import CsoError
from calling_score_opt.study import redact_url

RESULTS_FILENAME = "optimization_results.json"
RESULTS_SCHEMA = 1


class ResultsError(CsoError):
    """Raised when an existing results file cannot be merged into without losing what it holds."""


def data_section(path: Path, dataset: Dataset, split: Split) -> dict[str, Any]:
    """Which data the models were trained and checked on."""
    return {
        "path": str(path),
        "fingerprint": dataset.fingerprint,
        "records": dataset.n_records,
        "features": list(dataset.feature_names),
        "split": split.sizes,
        "split_seed": split.seed,
    }


def study_section(name: str, storage_url: str, artifacts: Path) -> dict[str, Any]:
    """Which study the models come from; the storage URL without its password (the file is
    committed and shipped with the app's assets)."""
    return {"name": name, "storage": redact_url(storage_url), "artifacts": str(artifacts)}


def document(
    data: Mapping[str, Any],
    study: Mapping[str, Any],
    variants: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    **sections: Any,
) -> dict[str, Any]:
    """A results document in the order people read it."""
    return {
        "schema_version": RESULTS_SCHEMA,
        "producer": f"cso {__version__}",
        "data": dict(data),
        "study": dict(study),
        **sections,
        "variants": [dict(v) for v in variants],
        "summary": dict(summary),
    }


def read_results(path: Path) -> dict[str, Any] | None:
    """The results document at ``path``, or None when there is none.

    Raises:
        ResultsError: the file exists but is not a results document cso can merge into.
    """
    if not path.exists():
        return None
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ResultsError(
            f"{path}: exists but cannot be read as a results file ({type(exc).__name__}); "
            "move it away or pass another --output-dir"
        ) from exc
    if not (
        isinstance(existing, dict)
        and isinstance(existing.get("variants"), list)
        and isinstance(existing.get("summary"), dict)
        and all(isinstance(v, dict) for v in existing["variants"])
    ):
        raise ResultsError(
            f"{path}: is not an optimization_results.json written by cso; "
            "move it away or pass another --output-dir"
        )
    return existing


def check_mergeable(existing: Mapping[str, Any] | None, path: Path, study: str, data: str) -> None:
    """Refuse to merge models of study ``study`` on data ``data`` into another study's file.

    Raises:
        ResultsError: the file lists models of another study or of other data.
    """
    if existing is None:
        return
    held_study = existing.get("study", {}).get("name")
    held_data = existing.get("data", {}).get("fingerprint")
    if held_study != study or held_data != data:
        raise ResultsError(
            f"{path}: holds the models of study '{held_study}'"
            + (" on other data" if held_study == study else "")
            + f"; writing study '{study}' there would mix them up or drop them: "
            "pass another --output-dir"
        )


def entry_name(existing: Mapping[str, Any] | None, name: str, trial_number: int) -> str:
    """``name``, or ``<name>_trial_<n>`` when the file already lists another model by it."""
    for entry in (existing or {}).get("variants", []):
        if entry.get("name") != name:
            continue
        numbers = entry.get("trial_numbers") or [entry.get("trial_number")]
        if numbers != [trial_number]:
            return f"{name}_trial_{trial_number}"
    return name


def merge_variants(
    existing: Mapping[str, Any] | None, entries: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The file's entries with ``entries`` merged in by name (an entry of the same name is
    updated, keeping what only the old entry had), ranked by validation loss.

    Ensembles are listed but not ranked: their weights were chosen on the validation split, so
    their validation loss flatters them.
    """
    merged = [dict(v) for v in (existing or {}).get("variants", [])]
    index = {v.get("name"): i for i, v in enumerate(merged)}
    for entry in entries:
        if entry["name"] in index:
            merged[index[entry["name"]]].update(entry)
        else:
            index[entry["name"]] = len(merged)
            merged.append(dict(entry))
    ranked = sorted(
        (
            v
            for v in merged
            if v.get("success") and v.get("kind") != "ensemble" and v.get("val_loss") is not None
        ),
        key=lambda v: v["val_loss"],
    )
    for v in merged:
        v.pop("rank", None)
    for rank, v in enumerate(ranked, start=1):
        v["rank"] = rank
    return merged


def best_single(variants: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The ranked entry with rank 1 (lowest validation loss), if any."""
    return next((v for v in variants if v.get("rank") == 1), None)


def write_results(path: Path, results: Mapping[str, Any]) -> None:
    """Write the document atomically (strict JSON: a NaN would make it unreadable elsewhere)."""
    write_text_atomic(path, json.dumps(results, indent=2, allow_nan=False) + "\n")
