"""Optuna storages, studies and trial artifacts: where every run's results and weights are kept.

A study is the unit of resumption: it remembers which data and settings produced it, so a rerun
continues it and a rerun on other data is refused instead of silently mixing results.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calling_score_opt.errors import StudyError

if TYPE_CHECKING:
    import optuna
    from optuna.artifacts import FileSystemArtifactStore
    from optuna.distributions import BaseDistribution
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

STUDIES_DIR = Path("studies")
CHECKPOINT_FILENAME = "model.pt"
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_SQLITE_PREFIX = "sqlite:///"


def check_study_name(name: str) -> str:
    if not _STUDY_NAME.match(name):
        raise StudyError(
            f"study name {name!r} must be 1-100 letters, digits, '.', '_' or '-' "
            "(it names files under studies/)"
        )
    return name


def default_storage_url(study_name: str) -> str:
    """``sqlite:///studies/<study>.db``, relative to the working directory."""
    return f"{_SQLITE_PREFIX}{STUDIES_DIR / check_study_name(study_name)}.db"


def default_artifact_dir(storage_url: str, study_name: str) -> Path:
    """Beside the SQLite file (``studies/x.db`` -> ``studies/x.artifacts``), else under studies/."""
    if storage_url.startswith(_SQLITE_PREFIX):
        db_path = Path(storage_url[len(_SQLITE_PREFIX) :])
        return db_path.with_name(f"{db_path.stem}.artifacts")
    return STUDIES_DIR / f"{study_name}.artifacts"


HEARTBEAT_INTERVAL_S = 5
GRACE_PERIOD_S = 20  # a trial silent this long belongs to a dead worker: failed and retried
STALE_TRIAL_RETRIES = 2


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers and one writer work at once: workers sharing a file wait less and never
    # see "database is locked" from a reader blocking a writer. NORMAL sync is safe with WAL.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def open_storage(url: str, heartbeat: bool = False) -> BaseStorage:
    """An RDB storage for ``url`` (SQLite or PostgreSQL), creating a SQLite file's folder.

    ``heartbeat`` turns on Optuna's heartbeats: a running trial whose worker stops beating for
    ``GRACE_PERIOD_S`` is marked failed and queued again (up to ``STALE_TRIAL_RETRIES`` times).
    """
    import warnings

    import optuna
    import sqlalchemy.exc
    from optuna.exceptions import ExperimentalWarning
    from sqlalchemy import event

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # cso reports trials itself
    engine_kwargs: dict[str, Any] = {}
    sqlite = url.startswith(_SQLITE_PREFIX)
    if sqlite:
        Path(url[len(_SQLITE_PREFIX) :]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}  # wait for a busy writer, don't fail
    heartbeat_kwargs: dict[str, Any] = {}
    if heartbeat:
        heartbeat_kwargs = {
            "heartbeat_interval": HEARTBEAT_INTERVAL_S,
            "grace_period": GRACE_PERIOD_S,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=STALE_TRIAL_RETRIES
            ),
        }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats are "experimental"
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, **heartbeat_kwargs
            )
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StudyError(
            f"--storage {url}: cannot open ({reason}); use sqlite:///path.db or "
            "postgresql://user:password@host/db"
        ) from exc
    if sqlite:
        event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # connections made from here on get the pragmas
    return storage


def open_study(storage: BaseStorage, name: str, identity: Mapping[str, Any]) -> optuna.Study:
    """Create the study, or load it when ``identity`` (data fingerprint, seed, ...) matches.

    Raises:
        StudyError: the stored study was made with different ``identity`` values.
    """
    import optuna

    study = optuna.create_study(
        study_name=check_study_name(name),
        storage=storage,
        direction="minimize",
        load_if_exists=True,
    )
    stored = study.user_attrs
    for key, value in identity.items():
        if key not in stored:
            study.set_user_attr(key, value)
        elif stored[key] != value:
            raise StudyError(
                f"study '{name}' was run with {key} = {stored[key]!r}, this run has {value!r}; "
                "pass --study NEW_NAME (or delete the study) to start over"
            )
    return study


def record_trial(
    study: optuna.Study,
    *,
    params: Mapping[str, Any],
    distributions: Mapping[str, BaseDistribution],
    value: float | None,
    user_attrs: Mapping[str, Any],
    intermediate_values: Mapping[int, float],
    artifact_store: FileSystemArtifactStore | None = None,
    checkpoint: bytes | None = None,
) -> FrozenTrial:
    """Store one finished run as a trial in a handful of writes (not one per epoch).

    ``value`` None records a failed trial. The trial is created RUNNING with everything at
    once, gets its checkpoint artifact, then is finished: a crash in between leaves a RUNNING
    trial that resumption ignores, never a complete trial without weights.
    """
    import optuna
    from optuna.artifacts import upload_artifact
    from optuna.trial import TrialState

    storage = study._storage  # public on Trial, private on Study; one storage per study
    template = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        params=dict(params),
        distributions=dict(distributions),
        user_attrs=dict(user_attrs),
        intermediate_values=dict(intermediate_values),
    )
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.create_new_trial(study_id, template_trial=template)
    if checkpoint is not None and artifact_store is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CHECKPOINT_FILENAME
            path.write_bytes(checkpoint)
            upload_artifact(
                artifact_store=artifact_store,
                file_path=str(path),
                study_or_trial=storage.get_trial(trial_id),
                storage=storage,
                mimetype="application/octet-stream",
            )
    if value is None:
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    else:
        storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])
    return storage.get_trial(trial_id)


def artifact_store(directory: Path) -> FileSystemArtifactStore:
    from optuna.artifacts import FileSystemArtifactStore

    directory.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(directory))


def read_checkpoint(
    store: FileSystemArtifactStore, storage: BaseStorage, trial: FrozenTrial
) -> bytes:
    """The weights stored with ``trial``.

    Raises:
        StudyError: the trial has no stored weights, or their file is gone.
    """
    from optuna.artifacts import download_artifact, get_all_artifact_meta

    metas = [
        m
        for m in get_all_artifact_meta(trial, storage=storage)
        if m.filename == CHECKPOINT_FILENAME
    ]
    if not metas:
        raise StudyError(f"trial {trial.number} has no stored weights; it must be retrained")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT_FILENAME
        try:
            download_artifact(
                artifact_store=store, file_path=str(path), artifact_id=metas[-1].artifact_id
            )
        except Exception as exc:  # the store raises its own not-found type, or OSError
            raise StudyError(
                f"trial {trial.number}: its weights ({metas[-1].artifact_id}) are missing from "
                "the artifact folder; pass the right --artifacts folder or retrain"
            ) from exc
        return path.read_bytes()
