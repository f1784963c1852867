"""A/B routing (docs/routing.md): sticky, documented, even, and ramp-up only moves users in."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from calling_score_opt.registry import (
    ABTest,
    ModelTypeRegistry,
    ModelVersion,
    Registry,
    RegistryError,
    bucket,
    bucket_int,
    gets_candidate,
    route_user,
    routing_test_vectors,
    routing_test_vectors_text,
)

VECTORS_FILE = Path(__file__).resolve().parents[1] / "docs" / "routing_test_vectors.json"
USERS = [f"user_{i}" for i in range(10_000)]
SALT = "calling_score:v1.1-hybrid:0123456789abcdef"


def _registry(active: str, test: ABTest | None) -> Registry:
    """A registry held in memory: ``active`` and, when there is a test, its candidate."""
    versions = {
        active: ModelVersion(active, f"{active}.onnx", 0.1, "synthetic", "active", "0" * 64)
    }
    if test is not None:
        versions[test.candidate] = ModelVersion(
            test.candidate, "c.onnx", 0.1, "synthetic", "staging", "0" * 64
        )
    state = ModelTypeRegistry(active=active, ab_test=test, versions=versions)
    return Registry(path=Path("registry.json"), model_types={"calling_score": state})


def test_the_bucket_is_the_documented_formula() -> None:
    digest = hashlib.sha256(b"my-salt:user_42").digest()
    expected = int.from_bytes(digest[:8], "big")
    assert bucket_int("my-salt", "user_42") == expected
    assert bucket("my-salt", "user_42") == expected / 2**64
    assert 0 <= bucket("my-salt", "user_42") < 1
    # UTF-8, exactly as given: no trimming or case folding
    assert bucket_int("s", "ユーザー") == int.from_bytes(
        hashlib.sha256("s:ユーザー".encode()).digest()[:8], "big"
    )
    assert bucket("s", "User") != bucket("s", "user") != bucket("s", " user")


def test_the_committed_test_vectors_are_what_the_rule_produces() -> None:
    assert VECTORS_FILE.read_text(encoding="utf-8") == routing_test_vectors_text(), (
        "docs/routing_test_vectors.json is stale; regenerate it (see docs/routing.md)"
    )


def test_every_test_vector_routes_as_expected() -> None:
    document = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
    vectors = document["vectors"]
    assert len(vectors) == 330
    for case in vectors:
        test = ABTest(document["candidate"], case["traffic"], case["salt"], "2026-01-01")
        routed = route_user(_registry(document["active"], test), "calling_score", case["user_id"])
        assert routed.version == case["expected_version"], case
        assert f"{bucket_int(case['salt'], case['user_id']):016x}" == case["hash_prefix_hex"]
        assert routed.bucket == case["bucket"]
    # the vectors exercise both outcomes at every share below 1, and the strict "<"
    for share in (0.01, 0.1, 0.5, 0.9):
        got = {c["expected_version"] for c in vectors if c["traffic"] == share}
        assert got == {document["active"], document["candidate"]}, share
    assert all(c["expected_version"] == document["candidate"] for c in vectors if c["traffic"] == 1)
    near = [c for c in vectors if c["traffic"] == 0.1 and abs(c["bucket"] - 0.1) < 1e-6]
    assert {c["expected_version"] for c in near} == {"v1.0-hybrid", "v1.1-hybrid"}


def test_routing_is_a_pure_function_across_processes() -> None:
    """Same answers in a fresh interpreter with another hash seed: nothing depends on hash()."""
    here = [bucket_int(SALT, u) for u in USERS[:200]]
    code = (
        "import sys, json\n"
        "from calling_score_opt.registry import bucket_int\n"
        f"print(json.dumps([bucket_int({SALT!r}, f'user_{{i}}') for i in range(200)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(proc.stdout) == here
    assert [bucket_int(SALT, u) for u in USERS[:200]] == here


@pytest.mark.parametrize("share", [0.01, 0.1, 0.5, 0.9])
def test_10000_users_split_within_a_few_tenths_of_a_percent(share: float) -> None:
    observed = sum(gets_candidate(SALT, u, share) for u in USERS) / len(USERS)
    sd = math.sqrt(share * (1 - share) / len(USERS))  # binomial noise of a fair assignment
    assert abs(observed - share) < 3 * sd, (observed, share)
    assert abs(observed - share) < 0.006


def test_raising_traffic_only_moves_users_into_the_candidate() -> None:
    shares = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
    groups = [{u for u in USERS if gets_candidate(SALT, u, s)} for s in shares]
    for smaller, larger in itertools.pairwise(groups):
        assert smaller < larger  # a strict superset: users are added, none removed
    assert groups[-1] == set(USERS)  # 100% is everyone, exactly


def test_a_new_salt_reshuffles_users() -> None:
    first = {u for u in USERS if gets_candidate(SALT, u, 0.1)}
    other = {u for u in USERS if gets_candidate(SALT + "x", u, 0.1)}
    overlap = len(first & other) / len(first)
    assert 0.05 < overlap < 0.15  # about 10%: independent, not the same users again


def test_route_explains_its_choice() -> None:
    test = ABTest("v1.1-hybrid", 0.5, SALT, "2026-01-01")
    registry = _registry("v1.0-hybrid", test)
    inside = next(u for u in USERS if gets_candidate(SALT, u, 0.5))
    outside = next(u for u in USERS if not gets_candidate(SALT, u, 0.5))
    routed_in = route_user(registry, "calling_score", inside)
    routed_out = route_user(registry, "calling_score", outside)
    assert (routed_in.version, routed_in.role) == ("v1.1-hybrid", "candidate")
    assert (routed_out.version, routed_out.role) == ("v1.0-hybrid", "active")
    assert f"bucket {bucket(SALT, inside):.6f} < traffic 0.5" in routed_in.reason
    assert ">= traffic 0.5 of candidate 'v1.1-hybrid'" in routed_out.reason
    no_test = route_user(_registry("v1.0-hybrid", None), "calling_score", inside)
    assert no_test.version == "v1.0-hybrid"
    assert "no A/B test is running" in no_test.reason
    with pytest.raises(RegistryError, match="--user-id must not be empty"):
        route_user(registry, "calling_score", "")


def test_the_vectors_function_is_deterministic() -> None:
    assert routing_test_vectors() == routing_test_vectors()
