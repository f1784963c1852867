"""A/B routing (docs/routing.md): which version a user gets, as a pure function of three values.

``bucket(salt, user_id) < traffic`` decides; the app, ``cso registry route`` and the A/B
report's assignment check all compute the same answer. docs/routing_test_vectors.json is
generated here, so the documented rule and this code cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from calling_score_opt.registry.records import ABTest, Registry, RegistryError


def bucket_int(salt: str, user_id: str) -> int:
    """The first 8 bytes of SHA-256 over UTF-8 ``f"{salt}:{user_id}"``, big-endian unsigned."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{user_id}".encode()).digest()[:8], "big")


def bucket(salt: str, user_id: str) -> float:
    """The user's bucket in [0, 1): :func:`bucket_int` / 2^64."""
    return bucket_int(salt, user_id) / 2**64


def gets_candidate(salt: str, user_id: str, traffic: float) -> bool:
    """Whether the user is in the candidate's share: bucket < traffic.

    Compared exactly (the integer against ``traffic * 2^64``), so a share of 1 is everyone.
    """
    return bucket_int(salt, user_id) < traffic * 2**64


@dataclass(frozen=True)
class Route:
    """Which version a user gets, and why."""

    user_id: str
    version: str
    role: str  # "candidate" or "active"
    active: str
    bucket: float | None
    test: ABTest | None

    @property
    def reason(self) -> str:
        if self.test is None:
            return f"'{self.active}' is the active version and no A/B test is running"
        share = f"{self.test.traffic:g}"
        if self.role == "candidate":
            return (
                f"bucket {self.bucket:.6f} < traffic {share}: in the A/B test's share for "
                f"candidate '{self.test.candidate}'"
            )
        return (
            f"bucket {self.bucket:.6f} >= traffic {share} of candidate '{self.test.candidate}': "
            f"the active version '{self.active}'"
        )


def route_user(registry: Registry, model_type: str, user_id: str) -> Route:
    """The version ``user_id`` gets now (docs/routing.md)."""
    state = registry.of(model_type)
    if not user_id:
        raise RegistryError("--user-id must not be empty")
    if state.active is None:
        raise RegistryError(f"no active {model_type} version in {registry.path}: promote one first")
    test = state.ab_test
    if test is None:
        return Route(user_id, state.active, "active", state.active, None, None)
    inside = gets_candidate(test.salt, user_id, test.traffic)
    return Route(
        user_id,
        test.candidate if inside else state.active,
        "candidate" if inside else "active",
        state.active,
        bucket(test.salt, user_id),
        test,
    )


VECTOR_ACTIVE = "v1.0-hybrid"
VECTOR_CANDIDATE = "v1.1-hybrid"
VECTOR_SALTS = ("calling_score:v1.1-hybrid:9f2c4e6a1b3d5f70", "outcome:v2.0-real:0", "s")
VECTOR_USERS = (
    *(f"user_{i}" for i in range(12)),
    "42",
    "alice@example.com",
    "a:b",
    "ユーザー42",
    "550e8400-e29b-41d4-a716-446655440000",
    # found by search: below 0.01 for each salt; just under and just over 0.1 for the first
    "user_16",
    "user_59",
    "user_22",
    "user_1932909",
    "user_204404",
)
VECTOR_TRAFFIC = (0.01, 0.1, 0.5, 0.9, 1.0)


def routing_test_vectors() -> dict[str, Any]:
    """The cases docs/routing_test_vectors.json holds, for the app to prove it agrees."""
    vectors = []
    for salt in VECTOR_SALTS:
        for user_id in VECTOR_USERS:
            value = bucket_int(salt, user_id)
            for traffic in VECTOR_TRAFFIC:
                inside = gets_candidate(salt, user_id, traffic)
                vectors.append(
                    {
                        "salt": salt,
                        "user_id": user_id,
                        "traffic": traffic,
                        "hash_prefix_hex": f"{value:016x}",
                        "bucket": value / 2**64,
                        "expected_version": VECTOR_CANDIDATE if inside else VECTOR_ACTIVE,
                    }
                )
    return {
        "rule": (
            "bucket = first 8 bytes of SHA-256 over the UTF-8 bytes of salt + ':' + user_id, "
            "read as a big-endian unsigned integer, divided by 2^64; the user gets the "
            "candidate when bucket < traffic, else the active version"
        ),
        "active": VECTOR_ACTIVE,
        "candidate": VECTOR_CANDIDATE,
        "generated_by": "calling_score_opt.registry.routing_test_vectors()",
        "vectors": vectors,
    }


def routing_test_vectors_text() -> str:
    return json.dumps(routing_test_vectors(), indent=2, ensure_ascii=False) + "\n"
