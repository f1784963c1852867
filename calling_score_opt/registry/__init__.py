"""The model version registry the app reads: versions, A/B tests, promotion and rollback.

One JSON file (``assets/models/registry.json`` by default) holds, per model type, every
registered version with the fields of the app's version record (docs/contract.md), the running
A/B test and a history of events. Every change is read-check-modify-write under a file lock and
written atomically, so concurrent commands never lose an update, a crash never leaves half a
file, and a refused change leaves the file byte for byte as it was. See docs/registry.md and
docs/routing.md.

One module per seam, imported in this order (each only uses the ones above it):

- :mod:`.records`: the records and the rules for single values;
- :mod:`.fileformat`: JSON text <-> validated records;
- :mod:`.lock`: :func:`update_registry`, the one way the file changes;
- :mod:`.inspection`: model files: the ONNX contract, metadata, sha256;
- :mod:`.featurespec`: which inputs a model takes, checked against the active version's;
- :mod:`.registration`: a checked file becomes a staging version;
- :mod:`.lifecycle`: A/B test, ramp, stop, promote, roll back, archive;
- :mod:`.routing`: which user gets which version (docs/routing.md);
- :mod:`.outcomes`: the outcomes CSV;
- :mod:`.assignment`: did users get what routing gave them, over the test's share history;
- :mod:`.abstats`: Welch's t interval and the always-valid interval;
- :mod:`.abreport`: the recommendation.

None imports numpy, scipy, onnx or torch at import time: ``cso --help`` stays fast.
"""

from __future__ import annotations

from calling_score_opt.registry.abreport import (
    METHOD,
    ABReport,
    ArmSummary,
    ab_report,
    report_metrics,
)
from calling_score_opt.registry.abstats import (
    ALPHA,
    MIN_USERS_PER_ARM,
    TUNING_USERS,
    SequentialInterval,
    WelchInterval,
    always_valid_interval,
    cs_multiplier,
    cs_rho,
    decide,
    users_needed,
    welch_interval,
)
from calling_score_opt.registry.assignment import (
    GRACE_S,
    SRM_ALPHA,
    ABPlan,
    AssignmentCheck,
    Band,
    SharePeriod,
    ab_plan,
    check_assignment,
)
from calling_score_opt.registry.featurespec import (
    FeatureSpec,
    check_feature_spec,
    feature_spec,
    short_hash,
)
from calling_score_opt.registry.fileformat import (
    MAX_DEPTH,
    load_registry,
    loads_json,
    parse_registry,
    registry_text,
)
from calling_score_opt.registry.inspection import (
    SMOKE_ROWS,
    InspectedModel,
    file_sha256,
    file_state,
    inspect_model,
)
from calling_score_opt.registry.lifecycle import (
    active_stack,
    archive,
    default_salt,
    promote,
    rollback,
    set_ab_traffic,
    start_ab_test,
    stop_ab_test,
)
from calling_score_opt.registry.lock import LOCK_TIMEOUT_S, update_registry
from calling_score_opt.registry.outcomes import OUTCOME_LIMIT, Outcome, read_outcomes
from calling_score_opt.registry.records import (
    DATA_SOURCES,
    DEFAULT_GRID_DIR,
    DEFAULT_REGISTRY,
    DEFAULT_VERSIONS_DIR,
    DEFAULT_WEIGHT,
    EVENTS,
    MODEL_TYPES,
    N_FEATURES,
    SCHEMA_VERSION,
    STATUSES,
    ABTest,
    HistoryEvent,
    ModelTypeRegistry,
    ModelVersion,
    Registry,
    RegistryError,
    check_data_source,
    check_default_weight,
    check_min_effect,
    check_model_type,
    check_traffic,
    check_version_name,
)
from calling_score_opt.registry.registration import (
    Registration,
    add_version,
    register_ensemble,
    register_model,
    register_trial,
    register_variant,
    trial_source,
)
from calling_score_opt.registry.routing import (
    VECTOR_ACTIVE,
    VECTOR_CANDIDATE,
    VECTOR_SALTS,
    VECTOR_TRAFFIC,
    VECTOR_USERS,
    Route,
    bucket,
    bucket_int,
    gets_candidate,
    route_user,
    routing_test_vectors,
    routing_test_vectors_text,
)

__all__ = [
    "ALPHA",
    "DATA_SOURCES",
    "DEFAULT_GRID_DIR",
    "DEFAULT_REGISTRY",
    "DEFAULT_VERSIONS_DIR",
    "DEFAULT_WEIGHT",
    "EVENTS",
    "GRACE_S",
    "LOCK_TIMEOUT_S",
    "MAX_DEPTH",
    "METHOD",
    "MIN_USERS_PER_ARM",
    "MODEL_TYPES",
    "N_FEATURES",
    "OUTCOME_LIMIT",
    "SCHEMA_VERSION",
    "SMOKE_ROWS",
    "SRM_ALPHA",
    "STATUSES",
    "TUNING_USERS",
    "VECTOR_ACTIVE",
    "VECTOR_CANDIDATE",
    "VECTOR_SALTS",
    "VECTOR_TRAFFIC",
    "VECTOR_USERS",
    "ABPlan",
    "ABReport",
    "ABTest",
    "ArmSummary",
    "AssignmentCheck",
    "Band",
    "FeatureSpec",
    "HistoryEvent",
    "InspectedModel",
    "ModelTypeRegistry",
    "ModelVersion",
    "Outcome",
    "Registration",
    "Registry",
    "RegistryError",
    "Route",
    "SequentialInterval",
    "SharePeriod",
    "WelchInterval",
    "ab_plan",
    "ab_report",
    "active_stack",
    "add_version",
    "always_valid_interval",
    "archive",
    "bucket",
    "bucket_int",
    "check_assignment",
    "check_data_source",
    "check_default_weight",
    "check_feature_spec",
    "check_min_effect",
    "check_model_type",
    "check_traffic",
    "check_version_name",
    "cs_multiplier",
    "cs_rho",
    "decide",
    "default_salt",
    "feature_spec",
    "file_sha256",
    "file_state",
    "gets_candidate",
    "inspect_model",
    "load_registry",
    "loads_json",
    "parse_registry",
    "promote",
    "read_outcomes",
    "register_ensemble",
    "register_model",
    "register_trial",
    "register_variant",
    "registry_text",
    "report_metrics",
    "rollback",
    "route_user",
    "routing_test_vectors",
    "routing_test_vectors_text",
    "set_ab_traffic",
    "short_hash",
    "start_ab_test",
    "stop_ab_test",
    "trial_source",
    "update_registry",
    "users_needed",
    "welch_interval",
]
