"""The release workflow's state changes: A/B test, ramp, stop, promote, roll back, archive.

Each function checks the rule of docs/registry.md ("States and the rules between them") and
changes the loaded registry in place, appending a history event; the caller writes it through
:func:`~calling_score_opt.registry.lock.update_registry`, so a refusal writes nothing.
"""

from __future__ import annotations

import secrets

from calling_score_opt.registry.inspection import check_servable
from calling_score_opt.registry.records import (
    ABTest,
    HistoryEvent,
    ModelTypeRegistry,
    Registry,
    RegistryError,
    check_min_effect,
    check_traffic,
    utc_now,
)


def default_salt(model_type: str, candidate: str) -> str:
    """A fresh salt for a new test: a new test reshuffles users, a ramp keeps them."""
    return f"{model_type}:{candidate}:{secrets.token_hex(8)}"


def _running_test(registry: Registry, model_type: str, version: str) -> ABTest:
    test = registry.of(model_type).ab_test
    registry.version(model_type, version)
    if test is None:
        raise RegistryError(f"no {model_type} A/B test is running (start one with ab-start)")
    if test.candidate != version:
        raise RegistryError(
            f"the running {model_type} A/B test is of '{test.candidate}', not '{version}'"
        )
    return test


def start_ab_test(
    registry: Registry,
    model_type: str,
    version: str,
    traffic: float,
    salt: str | None = None,
    min_effect: float | None = None,
) -> ABTest:
    """Start testing staging ``version`` on ``traffic`` of users against the active version.

    ``min_effect``, the smallest difference worth shipping, is fixed here, before any outcome
    is seen: the A/B report sizes the test from it.
    """
    check_traffic(traffic)
    if min_effect is not None:
        check_min_effect(min_effect)
    state = registry.of(model_type)
    record = registry.version(model_type, version)
    if state.ab_test is not None:
        test = state.ab_test
        hint = (
            f"change its traffic with ab-set {version} --traffic T"
            if test.candidate == version
            else f"stop it first: cso registry ab-stop {test.candidate}"
        )
        raise RegistryError(
            f"an A/B test of '{test.candidate}' ({test.traffic:g} of traffic) is already running; "
            f"one test per model type: {hint}"
        )
    if record.status != "staging":
        raise RegistryError(
            f"'{version}' is {record.status}; only staging versions are A/B tested "
            "(register the file again under a new version to test it again)"
        )
    if state.active is None:
        raise RegistryError(
            f"no active {model_type} version to test '{version}' against; promote one first "
            "(the first version may be promoted directly)"
        )
    if salt is not None and not salt:
        raise RegistryError("--salt must not be empty")
    check_servable(record)
    test = ABTest(
        version,
        float(traffic),
        salt or default_salt(model_type, version),
        utc_now(),
        None if min_effect is None else float(min_effect),
    )
    state.ab_test = test
    record.ab_test_traffic_percentage = test.traffic
    record.ab_test_start_date = test.started
    state.history.append(
        HistoryEvent(
            test.started,
            "ab-start",
            version,
            state.active,
            state.active,
            test.traffic,
            salt=test.salt,
            min_effect=test.min_effect,
        )
    )
    return test


def set_ab_traffic(registry: Registry, model_type: str, version: str, traffic: float) -> float:
    """Ramp the running test of ``version`` up or down; the salt stays. Returns the old share."""
    check_traffic(traffic)
    test = _running_test(registry, model_type, version)
    state = registry.of(model_type)
    old, test.traffic = test.traffic, float(traffic)
    registry.version(model_type, version).ab_test_traffic_percentage = test.traffic
    state.history.append(
        HistoryEvent(utc_now(), "ab-set", version, state.active, state.active, test.traffic)
    )
    return old


def stop_ab_test(registry: Registry, model_type: str, version: str) -> ABTest:
    """End the running test of ``version``: every user gets the active version again."""
    test = _running_test(registry, model_type, version)
    state = registry.of(model_type)
    state.ab_test = None
    registry.version(model_type, version).ab_test_traffic_percentage = None
    state.history.append(
        HistoryEvent(utc_now(), "ab-stop", version, state.active, state.active, test.traffic)
    )
    return test


def _was_active(state: ModelTypeRegistry, version: str) -> bool:
    return any(e.active == version for e in state.history if e.event in ("promote", "rollback"))


def promote(
    registry: Registry, model_type: str, version: str, without_ab_test: bool = False
) -> HistoryEvent:
    """Make ``version`` the active one; the old active version becomes deprecated.

    Allowed for the first version of a model type, the candidate of the running test (which
    ends it), a version that was active before, or with ``without_ab_test``.
    """
    state = registry.of(model_type)
    record = registry.version(model_type, version)
    test = state.ab_test
    if record.status == "active":
        raise RegistryError(f"'{version}' is already the active {model_type} version")
    if record.status == "archived":
        raise RegistryError(
            f"'{version}' is archived, and archived versions are never served again; "
            "register the file again under a new version"
        )
    if test is not None and test.candidate != version:
        raise RegistryError(
            f"an A/B test of '{test.candidate}' is running; promote it or stop it first "
            f"(cso registry ab-stop {test.candidate})"
        )
    tested = test is not None or state.active is None or _was_active(state, version)
    if not tested and not without_ab_test:
        raise RegistryError(
            f"'{version}' has not been A/B tested against the active '{state.active}': "
            f"start with cso registry ab-start {version} --traffic 0.1, or pass --without-ab-test"
        )
    check_servable(record)
    previous = state.active
    if previous is not None:
        state.versions[previous].status = "deprecated"
    record.status = "active"
    record.ab_test_traffic_percentage = None
    state.active, state.ab_test = version, None
    event = HistoryEvent(
        utc_now(), "promote", version, version, previous, test.traffic if test else None
    )
    state.history.append(event)
    return event


def active_stack(state: ModelTypeRegistry) -> list[str]:
    """The active versions in order, replayed from the history: promote pushes, rollback pops."""
    stack: list[str] = []
    for event in state.history:
        if event.event == "promote" and event.active is not None:
            stack.append(event.active)
        elif event.event == "rollback" and stack:
            stack.pop()
    return stack


def rollback(registry: Registry, model_type: str) -> HistoryEvent:
    """Make the previous active version (from the history) active again.

    The version rolled back from becomes deprecated; rolling back twice goes two steps back.
    """
    state = registry.of(model_type)
    current = state.active
    if state.ab_test is not None:
        cand = state.ab_test.candidate
        raise RegistryError(
            f"an A/B test of '{cand}' is running against '{current}'; to drop the candidate, "
            f"stop the test (cso registry ab-stop {cand}); rollback changes the active version"
        )
    if current is None:
        raise RegistryError(
            f"no active {model_type} version in {registry.path}: nothing to roll back"
        )
    stack = active_stack(state)
    if not stack or stack[-1] != current:
        raise RegistryError(
            f"the history of {model_type} does not end with the active version '{current}' "
            "(the file was edited by hand?): promote the version you want explicitly"
        )
    if len(stack) < 2:
        raise RegistryError(
            f"no previous active {model_type} version in the history ('{current}' is the first "
            "one promoted): nothing to roll back to"
        )
    target = stack[-2]
    record = registry.version(model_type, target)
    if record.status == "archived":
        raise RegistryError(
            f"the previous active version '{target}' is archived and is never served again; "
            "promote the version you want explicitly"
        )
    check_servable(record)
    state.versions[current].status = "deprecated"
    record.status = "active"
    state.active = target
    event = HistoryEvent(utc_now(), "rollback", target, target, current)
    state.history.append(event)
    return event


def archive(registry: Registry, model_type: str, version: str) -> None:
    """Retire ``version`` for good: it is never served again (never the active one)."""
    state = registry.of(model_type)
    record = registry.version(model_type, version)
    if record.status == "active":
        raise RegistryError(
            f"'{version}' is the active {model_type} version and cannot be archived; "
            "promote another version first"
        )
    if state.ab_test is not None and state.ab_test.candidate == version:
        raise RegistryError(
            f"'{version}' is in a running A/B test; stop it first (cso registry ab-stop {version})"
        )
    if record.status == "archived":
        raise RegistryError(f"'{version}' is already archived")
    record.status = "archived"
    state.history.append(HistoryEvent(utc_now(), "archive", version, state.active, state.active))
