"""The app's feature vectors for the test cases, built the way the app's live builder works today.

A Python model of the Dart builder (``_prepareNeuralNetworkFeatures`` in
lib/core/services/calling_score/calling_score_calculator.dart, and ``prepareFeatures`` in
lib/core/ml/calling_score_neural_model.dart), run on the records of docs/feature_vectors.json,
to show what ``cso contract check`` reports on it (docs/app-integration.md):

- each vibe block is read in the app's order (``APP_VIBE_ORDER``), which holds two keys that are
  not vibe dimensions (social_preference, overall_energy: 0.5 unless the dictionary has them)
  and leaves out social_discovery_style and curation_tendency;
- context and timing inputs are clamped to [0, 1], 0.5 when missing;
- vibe_compatibility, energy_match (from overall_energy), community_match, novelty_match and
  timing_alignment (the mean of the timing inputs present) are computed, never read. The app's
  ``SpotVibe.calculateVibeCompatibility`` is not reproduced here: vibe_compatibility uses the
  rule of docs/data.md instead.

    python bench/app_style_vectors.py --output /tmp/app_live.json               # today's builder
    python bench/app_style_vectors.py --builder vibe-fixed --output /tmp/app_fixed.json
    python bench/app_style_vectors.py --builder cso --output /tmp/app_cso.json  # a correct dump
    cso contract check /tmp/app_live.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from calling_score_opt.data import CONTEXT_FEATURES, TIMING_FEATURES, VIBE_DIMENSIONS
from calling_score_opt.feature_contract import record_features

VECTORS = Path(__file__).resolve().parents[1] / "docs" / "feature_vectors.json"
NEUTRAL = 0.5
#: The order in which the app's builder reads both vibe blocks today.
APP_VIBE_ORDER = (
    "exploration_eagerness",
    "community_orientation",
    "location_adventurousness",
    "authenticity_preference",
    "trust_network_reliance",
    "temporal_flexibility",
    "energy_preference",
    "novelty_seeking",
    "value_orientation",
    "crowd_tolerance",
    "social_preference",
    "overall_energy",
)


def _clamp(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def _group(record: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    values = record.get(name)
    return values if isinstance(values, dict) else {}


def _match(a: float | None, b: float | None) -> float:
    return NEUTRAL if a is None or b is None else _clamp(1.0 - abs(a - b))


def app_features(
    record: Mapping[str, Any], vibe_order: Sequence[str] = APP_VIBE_ORDER
) -> list[float]:
    """The 39 inputs the app's live builder sends for ``record`` (vibe blocks in ``vibe_order``)."""
    user = _group(record, "user_vibe_dimensions")
    spot = _group(record, "spot_vibe_dimensions")
    context = _group(record, "context_features")
    timing = _group(record, "timing_features")
    features = [float(user.get(name, NEUTRAL)) for name in vibe_order]  # not clamped
    features += [float(spot.get(name, NEUTRAL)) for name in vibe_order]
    features += [_clamp(context[n]) if n in context else NEUTRAL for n in CONTEXT_FEATURES[:6]]
    gaps = [abs(user.get(n, NEUTRAL) - spot.get(n, NEUTRAL)) for n in VIBE_DIMENSIONS]
    features += [
        _clamp(1.0 - sum(gaps) / len(gaps)),  # stands in for SpotVibe.calculateVibeCompatibility
        _match(user.get("overall_energy"), spot.get("overall_energy")),
        _match(user.get("community_orientation"), spot.get("community_orientation")),
        _match(user.get("novelty_seeking"), spot.get("novelty_seeking")),
    ]
    features += [_clamp(timing[n]) if n in timing else NEUTRAL for n in TIMING_FEATURES[:4]]
    known = [timing[n] for n in TIMING_FEATURES[:4] if n in timing]
    features.append(_clamp(sum(known) / len(known)) if known else NEUTRAL)
    return features


def vibe_fixed_features(record: Mapping[str, Any]) -> list[float]:
    """The builder with the fix of docs/app-integration.md: vibe blocks in the contract order."""
    return app_features(record, VIBE_DIMENSIONS)


def cso_features(record: Mapping[str, Any]) -> list[float]:
    """What cso trains on: a dump that agrees by construction."""
    return [float(v) for v in record_features(record)]


BUILDERS: dict[str, Callable[[Mapping[str, Any]], list[float]]] = {
    "live": app_features,
    "vibe-fixed": vibe_fixed_features,
    "cso": cso_features,
}


def app_vectors(document: Mapping[str, Any], builder: str = "live") -> dict[str, Any]:
    """The app's vectors file, ``{"cases": [{"id", "features"}]}``, for a vectors document."""
    build = BUILDERS[builder]
    return {
        "builder": builder,
        "cases": [{"id": c["id"], "features": build(c["record"])} for c in document["cases"]],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builder", choices=sorted(BUILDERS), default="live")
    parser.add_argument("--vectors", type=Path, default=VECTORS, help="the test vectors")
    parser.add_argument("--output", type=Path, help="where to write (default: stdout)")
    args = parser.parse_args(argv)
    document = json.loads(args.vectors.read_text(encoding="utf-8"))
    text = json.dumps(app_vectors(document, args.builder), indent=1) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
