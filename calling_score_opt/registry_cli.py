"""``cso registry``: register, A/B test, promote and roll back model versions (docs/registry.md).

Each command parses its options, calls one function of :mod:`calling_score_opt.registry` and
prints the result; changes happen inside :func:`~calling_score_opt.registry.update_registry`,
so a refused command leaves the registry file as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from calling_score_opt.console import console, fails_cleanly, print_table
from calling_score_opt.options import Storage
from calling_score_opt.registry import (
    DEFAULT_GRID_DIR,
    DEFAULT_REGISTRY,
    DEFAULT_VERSIONS_DIR,
    DEFAULT_WEIGHT,
    ModelVersion,
    RegistryError,
    load_registry,
    update_registry,
)

if TYPE_CHECKING:
    from calling_score_opt.registry import ABReport

registry_app = typer.Typer(
    help="The model version registry the app reads: register versions, A/B test them, "
    "promote and roll back.\n\nExample: cso registry list",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

RegistryPath = Annotated[
    Path, typer.Option("--registry", help="The registry file (JSON, read by the app).")
]
ModelType = Annotated[str, typer.Option(help="calling_score or outcome.")]
Version = Annotated[str, typer.Argument(help="A registered version, e.g. v1.1-hybrid.")]
Traffic = Annotated[
    float, typer.Option(help="Share of users who get the candidate, in (0, 1]: 0.1 = 10%.")
]


def _number(value: Any, digits: int = 5) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else ""


def _metrics_line(record: ModelVersion) -> str:
    metrics = record.training_metrics
    parts = [
        f"{label} {_number(metrics[key])}"
        for key, label in (("test_loss", "test loss"), ("val_loss", "val loss"))
        if key in metrics
    ]
    gain = metrics.get("improvement_vs_baseline")
    if isinstance(gain, int | float):
        parts.append(f"{gain:+.2f}% test loss vs the baseline trained with it")
    return ", ".join(parts) or "no training metrics in its metadata"


def _feature_spec_line(record: ModelVersion, active: str | None, reason: str | None) -> str:
    """How the new version's inputs compare with the active version's (featurespec.py)."""
    from calling_score_opt.registry import short_hash

    spec = f"feature spec {short_hash(record.feature_spec_hash)}"
    if record.feature_spec_hash is None:
        spec += " (its metadata does not name its inputs)"
    change = record.feature_spec_change
    if change is not None:
        return (
            f"{spec}: NEW, the active version {change['activeVersion']} has "
            f"{short_hash(change['from'])}; reason recorded: {change['reason']}; the app's "
            "feature builder must change with it before it serves traffic"
        )
    if active is None:
        unused = "; --new-feature-spec not recorded" if reason is not None else ""
        return f"{spec} (no active version to compare with{unused})"
    unused = " (--new-feature-spec not recorded)" if reason is not None else ""
    return f"{spec}, the same as the active version {active}{unused}"


@registry_app.command()
@fails_cleanly
def register(
    version: Annotated[str, typer.Option(help="The new version's name, e.g. v1.1-hybrid.")],
    data_source: Annotated[
        str, typer.Option(help="What it was trained on: synthetic, hybrid_big_five, real_data.")
    ],
    model: Annotated[Path | None, typer.Option(help="Register this ONNX file.")] = None,
    trial: Annotated[
        int | None, typer.Option(help="Export trial N of --study and register it.")
    ] = None,
    variant: Annotated[
        str | None, typer.Option(help="Register grid variant NAME from --grid-dir.")
    ] = None,
    ensemble: Annotated[
        bool,
        typer.Option(
            "--ensemble",
            help="Build the best ensemble of --study's complete trials (as cso export "
            "--ensemble) and register it.",
        ),
    ] = False,
    study: Annotated[str, typer.Option(help="Optuna study of --trial or --ensemble.")] = (
        "calling-score-search"
    ),
    storage: Storage = None,
    grid_dir: Annotated[Path, typer.Option(help="Where cso grid wrote the variants.")] = (
        DEFAULT_GRID_DIR
    ),
    versions_dir: Annotated[
        Path, typer.Option(help="Where --trial exports go (<dir>/<model-type>/<version>/).")
    ] = DEFAULT_VERSIONS_DIR,
    description: Annotated[
        str | None, typer.Option(help="Free text (default: variant, hyperparameters, gain).")
    ] = None,
    default_weight: Annotated[
        float, typer.Option(help="Weight of the neural score against the formula score, 0-1.")
    ] = DEFAULT_WEIGHT,
    new_feature_spec: Annotated[
        str | None,
        typer.Option(
            metavar="REASON",
            help="Register a model whose inputs (names or order) differ from the active "
            "version's, and record why.",
        ),
    ] = None,
    model_type: ModelType = "calling_score",
    registry: RegistryPath = DEFAULT_REGISTRY,
) -> None:
    """Register a model as a new staging version (refused if it breaks the ONNX contract).

    Exactly one of --model PATH, --trial N (exported from --study), --variant NAME (from
    --grid-dir) or --ensemble (the best ensemble of --study's trials). Training metrics come
    from the model's metadata and the results file beside it. A model whose inputs differ from
    the active version's is refused unless --new-feature-spec says why.

    Example: cso registry register --version v1.1 --variant v1_1_lr_0.0005 --data-source synthetic
    """
    from calling_score_opt.registry import (
        Registration,
        register_ensemble,
        register_model,
        register_trial,
        register_variant,
    )

    if sum((model is not None, trial is not None, variant is not None, ensemble)) != 1:
        raise RegistryError(
            "say which model to register: exactly one of --model PATH, --trial N, "
            "--variant NAME, --ensemble"
        )
    registration = Registration(
        version=version,
        data_source=data_source,
        model_type=model_type,
        default_weight=default_weight,
        description=description,
        new_feature_spec=new_feature_spec,
    )
    if model is not None:
        record = register_model(registry, registration, model)
    elif variant is not None:
        record = register_variant(registry, registration, variant, grid_dir)
    else:
        from calling_score_opt.study import default_storage_url

        url = storage or default_storage_url(study)
        if ensemble:
            record = register_ensemble(registry, registration, study, url, versions_dir)
        else:
            assert trial is not None
            record = register_trial(registry, registration, trial, study, url, versions_dir)
    name = escape(record.version)
    console.print(f"Registered {model_type} version {name} (staging)", highlight=False)
    console.print(
        f"  file: {escape(record.model_path)} (sha256 {record.sha256[:12]})", highlight=False
    )
    console.print(f"  {_metrics_line(record)}", highlight=False)
    active = load_registry(registry).of(model_type).active
    console.print(
        f"  {escape(_feature_spec_line(record, active, new_feature_spec))}",
        highlight=False,
        soft_wrap=True,
    )
    flag = "" if model_type == "calling_score" else f" --model-type {model_type}"
    if active is None:
        nxt = f"cso registry promote {name}{flag} (the first version may be promoted directly)"
    else:
        nxt = f"cso registry ab-start {name} --traffic 0.1{flag}"
    console.print(f"Next: {nxt}", highlight=False)


@registry_app.command("list")
@fails_cleanly
def list_versions(
    model_type: ModelType = "calling_score", registry: RegistryPath = DEFAULT_REGISTRY
) -> None:
    """List the versions of a model type: status, traffic, losses, the feature spec (the first
    digits of its hash: versions with the same inputs show the same) and whether the file is
    intact.

    Example: cso registry list --model-type calling_score
    """
    from calling_score_opt.registry import file_state

    loaded = load_registry(registry)
    state = loaded.of(model_type)
    test = state.ab_test
    console.print(
        f"{model_type} in {escape(str(registry))}: active "
        f"{escape(state.active) if state.active else 'none'}; A/B test: "
        + (
            f"{escape(test.candidate)} at {test.traffic:g} since {test.started}" if test else "none"
        ),
        highlight=False,
    )
    if not state.versions:
        console.print("No versions yet: cso registry register --version V ...", highlight=False)
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    numeric = ("traffic", "test loss", "val loss", "gain")
    for column in ("version", "status", *numeric, "trained", "features", "file"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for record in state.versions.values():
        metrics = record.training_metrics
        gain = metrics.get("improvement_vs_baseline")
        traffic = record.ab_test_traffic_percentage
        table.add_row(
            escape(record.version),
            record.status,
            "" if traffic is None else f"{traffic:g}",
            _number(metrics.get("test_loss"), 4),
            _number(metrics.get("val_loss"), 4),
            f"{gain:+.1f}%" if isinstance(gain, int | float) else "",
            escape((record.trained_date or "")[:10]),
            _spec_cell(record),
            file_state(record),
        )
    print_table(table)  # piped: 120 columns, so version names are never cut


def _spec_cell(record: ModelVersion) -> str:
    """The feature spec hash's first 8 hex digits; ``new`` marks a --new-feature-spec version."""
    spec = record.feature_spec_hash
    if spec is None:
        return ""  # unknown, or registered before cso recorded it
    cell = spec.partition(":")[2][:8] or spec[:8]
    return escape(f"{cell} new" if record.feature_spec_change else cell)


@registry_app.command()
@fails_cleanly
def show(
    version: Version,
    model_type: ModelType = "calling_score",
    registry: RegistryPath = DEFAULT_REGISTRY,
) -> None:
    """Show everything about one version: its record, its file's state and its history.

    Example: cso registry show v1.1-hybrid
    """
    import json

    from calling_score_opt.registry import file_state

    loaded = load_registry(registry)
    record = loaded.version(model_type, version)
    console.print(f"{model_type} version {escape(version)}", highlight=False)
    console.print(
        escape(json.dumps(record.to_json(), indent=2, ensure_ascii=False)),
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"file: {file_state(record)}", highlight=False)
    for event in loaded.of(model_type).history:
        if version in (event.version, event.active, event.previous):
            traffic = "" if event.traffic is None else f" traffic {event.traffic:g}"
            console.print(
                escape(
                    f"{event.at} {event.event} {event.version or ''}{traffic} "
                    f"(active: {event.active or 'none'})"
                ),
                highlight=False,
            )


@registry_app.command("ab-start")
@fails_cleanly
def ab_start(
    version: Version,
    traffic: Traffic = 0.1,
    salt: Annotated[
        str | None,
        typer.Option(help="Routing salt (default: <model-type>:<version>:<random hex>)."),
    ] = None,
    min_effect: Annotated[
        float | None,
        typer.Option(
            help="Smallest difference in mean outcome worth shipping; sizes the test "
            "(ab-report's users needed). Fix it now, before any outcome is seen."
        ),
    ] = None,
    model_type: ModelType = "calling_score",
    registry: RegistryPath = DEFAULT_REGISTRY,
) -> None:
    """Start an A/B test: a share of users gets the staging VERSION, the rest the active one.

    Example: cso registry ab-start v1.1-hybrid --traffic 0.1 --min-effect 0.02
    """
    from calling_score_opt.registry import start_ab_test

    with update_registry(registry) as loaded:
        test = start_ab_test(loaded, model_type, version, traffic, salt, min_effect)
        active = loaded.of(model_type).active
    planned = (
        "" if test.min_effect is None else f"; smallest effect worth shipping {test.min_effect:g}"
    )
    console.print(
        f"A/B test started: {test.traffic:g} of users get {escape(version)}, the rest "
        f"{escape(str(active))} (salt {escape(test.salt)}{planned})",
        highlight=False,
    )


@registry_app.command("ab-set")
@fails_cleanly
def ab_set(
    version: Version,
    traffic: Annotated[
        float, typer.Option(help="New share of users for the candidate, in (0, 1].")
    ],
    model_type: ModelType = "calling_score",
    registry: RegistryPath = DEFAULT_REGISTRY,
) -> None:
    """Ramp the running A/B test up or down; raising it only moves users into the candidate.

    Example: cso registry ab-set v1.1-hybrid --traffic 0.5
    """
    from calling_score_opt.registry import set_ab_traffic

    with update_registry(registry) as loaded:
        old = set_ab_traffic(loaded, model_type, version, traffic)
    console.print(f"A/B test of {escape(version)}: traffic {old:g} -> {traffic:g}", highlight=False)


@registry_app.command("ab-stop")
@fails_cleanly
def ab_stop(
    version: Version,
    model_type: ModelType = "calling_score",
    registry: RegistryPath = DEFAULT_REGISTRY,
) -> None:
    """Stop the running A/B test: every user gets the active version again.

    VERSION stays staging (archive it if it did worse).

    Example: cso registry ab-stop v1.1-hybrid
    """
    from calling_score_opt.registry import stop_ab_test

    with update_registry(registry) as loaded:
        stop_ab_test(loaded, model_type, version)
        active = loaded.of(model_type).active
    console.print(
        f"A/B test of {escape(version)} stopped: every user gets {escape(str(active))}",
        highlight=False,
    )


@registry_app.command()
@fails_cleanly
def route(
    user_id: Annotated[str, typer.Option(help="The user's id, exactly as the app has it.")],
    model_type: ModelType = "calling_score",
    registry: RegistryPath = DEFAULT_REGISTRY,
) -> None:
    """Say which version a user gets now, and why (the rule of docs/routing.md).

    Example: cso registry route --user-id user_123
    """
    from calling_score_opt.registry import route_user

    decision = route_user(load_registry(registry), model_type, user_id)
    console.print(f"{escape(user_id)} -> {escape(decision.version)}", highlight=False)
    console.print(f"why: {escape(decision.reason)}", highlight=False)


@registry_app.command()
@fails_cleanly
def promote(
    version: Version,
    without_ab_test: Annotated[
        bool,
        typer.Option("--without-ab-test", help="Promote a version that was never A/B tested."),
    ] = False,
    model_type: ModelType = "calling_score",
    registry: RegistryPath = DEFAULT_REGISTRY,
) -> None:
    """Make VERSION the active one (ending its A/B test); the old active version is deprecated.

    Example: cso registry promote v1.1-hybrid
    """
    from calling_score_opt.registry import promote as promote_version

    with update_registry(registry) as loaded:
        event = promote_version(loaded, model_type, version, without_ab_test)
    was = f" (was {escape(event.previous)}, now deprecated)" if event.previous else ""
    console.print(f"Active {model_type} version: {escape(version)}{was}", highlight=False)


@registry_app.command()
@fails_cleanly
def rollback(
    model_type: ModelType = "calling_score", registry: RegistryPath = DEFAULT_REGISTRY
) -> None:
    """Go back to the previous active version in the history; the current one is deprecated.

    Example: cso registry rollback
    """
    from calling_score_opt.registry import rollback as rollback_version

    with update_registry(registry) as loaded:
        event = rollback_version(loaded, model_type)
    console.print(
        f"Rolled back {model_type}: {escape(str(event.previous))} -> {escape(str(event.active))}",
        highlight=False,
    )


@registry_app.command()
@fails_cleanly
def archive(
    version: Version,
    model_type: ModelType = "calling_score",
    registry: RegistryPath = DEFAULT_REGISTRY,
) -> None:
    """Archive a version for good: never served again (never the active one).

    Example: cso registry archive v1.0-hybrid
    """
    from calling_score_opt.registry import archive as archive_version

    with update_registry(registry) as loaded:
        archive_version(loaded, model_type, version)
    console.print(f"Archived {model_type} version {escape(version)}", highlight=False)


@registry_app.command("ab-report")
@fails_cleanly
def ab_report(
    outcomes: Annotated[
        Path,
        typer.Option(
            help="CSV with columns user_id, version, outcome and optionally timestamp (one row "
            "per event)."
        ),
    ],
    lower_is_better: Annotated[
        bool, typer.Option("--lower-is-better", help="A lower outcome is better.")
    ] = False,
    candidate: Annotated[
        str | None, typer.Option(help="Candidate version (default: the running test's).")
    ] = None,
    traffic: Annotated[
        float | None,
        typer.Option(
            help="Share the outcomes were collected under (default: every share the test's "
            "history records, ramps included)."
        ),
    ] = None,
    min_effect: Annotated[
        float | None,
        typer.Option(
            help="Smallest difference worth shipping, for a test started without "
            "ab-start --min-effect: sizes 'keep testing'."
        ),
    ] = None,
    save: Annotated[
        bool, typer.Option("--save", help="Store the result in the candidate's performanceMetrics.")
    ] = False,
    model_type: ModelType = "calling_score",
    registry: RegistryPath = DEFAULT_REGISTRY,
) -> None:
    """Compare the candidate with the active version on outcomes and recommend what to do.

    Prints per version the users, rows and mean outcome; the difference with Welch's t interval
    (one look) and the always-valid interval (any look: run it daily); a check that users got
    the version routing gave them over the test's history; and one Recommendation line:
    promote, keep testing, roll back or check the assignment.

    Example: cso registry ab-report --outcomes outcomes.csv
    """
    from calling_score_opt.registry import ab_plan, check_traffic, read_outcomes
    from calling_score_opt.registry import ab_report as compare

    if traffic is not None:
        check_traffic(traffic)
    plan = ab_plan(load_registry(registry), model_type, candidate, traffic)
    report = compare(
        read_outcomes(outcomes),
        plan,
        higher_is_better=not lower_is_better,
        min_effect=min_effect,
    )
    _print_report(report)
    name = escape(plan.candidate)
    nxt = {
        "promote": f"cso registry promote {name}"
        + (
            f" (the guide first raises traffic: cso registry ab-set {name} --traffic 0.5)"
            if report.traffic < 0.5
            else ""
        ),
        "roll back": f"cso registry ab-stop {name}, then cso registry archive {name}",
        "keep testing": "collect more outcomes and run ab-report again (daily looks are fine)",
        "check the assignment": "find why users do not get the version routing gives them "
        "(cso registry route --user-id U) before deciding",
    }[report.recommendation]
    console.print(f"Next: {nxt}", highlight=False, soft_wrap=True)
    if save:
        from calling_score_opt.registry import report_metrics

        with update_registry(registry) as changing:
            record = changing.version(model_type, plan.candidate)
            record.performance_metrics["ab_report"] = report_metrics(report, str(outcomes))
        console.print(f"Saved to {name}'s performanceMetrics.ab_report", highlight=False)


def _print_report(report: ABReport) -> None:
    """The report as people read it; the last line is the Recommendation."""
    from calling_score_opt.registry import (
        ALPHA,
        METHOD,
        MIN_USERS_PER_ARM,
        TUNING_USERS,
    )

    table = Table(title_justify="left")
    for column in ("version", "role", "users", "rows", "mean outcome", "sd"):
        table.add_column(column, justify="left" if column in ("version", "role") else "right")
    for arm in (report.control, report.candidate):
        table.add_row(
            escape(arm.version),
            arm.role,
            f"{arm.users:,}",
            f"{arm.rows:,}",
            _number(arm.mean),
            _number(arm.sd),
        )
    console.print(table)
    level = f"{1 - ALPHA:.0%}"
    direction = "lower" if not report.higher_is_better else "higher"
    welch, sequential = report.welch, report.sequential
    if welch is not None and sequential is not None:
        console.print(
            f"Difference (candidate - active): {welch.difference:+.5f} ({direction} is better)",
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            f"  Welch t {level} interval, one look: [{welch.low:+.5f}, {welch.high:+.5f}], "
            f"df {welch.df:.1f}, p = {welch.p_value:.3g}",
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            f"  Always-valid {level} interval, any look: [{sequential.low:+.5f}, "
            f"{sequential.high:+.5f}], p = {sequential.p_value:.3g}",
            highlight=False,
            soft_wrap=True,
        )
    check = report.assignment
    plan = report.plan
    if plan.salt is not None:
        rule = "at each row's time" if check.timestamps else "at any share of the test"
        shares = " -> ".join(f"{p.traffic:g}" for p in plan.periods)
        console.print(
            f"Assignment: {len(check.violators):,} of {check.users:,} users seen on a version "
            f"routing never gave them ({rule}; shares {shares}; at most {check.tolerance:,} "
            f"tolerated): {'MISROUTED' if check.misrouted else 'ok'}",
            highlight=False,
            soft_wrap=True,
        )
        bands = ", ".join(
            f"[{b.low:g}, {b.high:g}) {b.users:,} ({b.expected:,.0f} expected)" for b in check.bands
        )
        console.print(
            f"Split: users per routing band {bands}; chi-square {check.chi2:.2f}, "
            f"p = {check.p_value:.3g}: {'MISMATCH' if check.mismatch else 'ok'}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        control_band, candidate_band = check.bands
        total = control_band.users + candidate_band.users
        share = candidate_band.users / total if total else 0.0
        console.print(
            f"Split: {share:.2%} of users got the candidate, {report.traffic:.2%} configured "
            f"(chi-square {check.chi2:.2f}, p = {check.p_value:.3g}; the routing salt is not "
            f"recorded, so users are not checked one by one): "
            f"{'MISMATCH' if check.mismatch else 'ok'}",
            highlight=False,
            soft_wrap=True,
        )
    left_out = [
        (report.users_in_both, "users seen under both versions"),
        (len(check.violators), "users on a version routing never gave them"),
        (report.rows_ignored, "rows of other versions"),
        (report.rows_outside, "rows timed outside the test"),
    ]
    if any(count for count, _ in left_out):
        console.print(
            "Left out: " + ", ".join(f"{count:,} {what}" for count, what in left_out if count),
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"Method: {METHOD}, tuned for {TUNING_USERS:,} users; promote or roll back needs "
        f"{MIN_USERS_PER_ARM} users per version"
        + ("" if report.min_effect is None else f"; --min-effect {report.min_effect:g}"),
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"Recommendation: {report.recommendation}: {escape(report.reason)}",
        highlight=False,
        soft_wrap=True,
    )


if __name__ == "__main__":  # pragma: no cover
    registry_app(prog_name="cso registry")
