"""Optuna storages, studies and trial artifacts: where every run's results and weights are kept.

A study is the unit of resumption: it remembers which data and settings produced it, so a rerun
continues it and a rerun on other data is refused instead of silently mixing results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calling_score_opt.errors import CsoError, StudyError

if TYPE_CHECKING:
    import optuna
    from optuna.artifacts import FileSystemArtifactStore
    from optuna.distributions import BaseDistribution
    from optuna.storages import BaseStorage, RDBStorage
    from optuna.trial import FrozenTrial

    from calling_score_opt.data import Dataset

STUDIES_DIR = Path("studies")
CHECKPOINT_FILENAME = "model.pt"
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_SQLITE_PREFIX = "sqlite:///"


#: The documented baseline's variant name (space.py re-exports it; here it costs no torch import).
BASELINE_VARIANT = "v1_0_baseline"
#: User attribute that marks a study's baseline trial, whatever its number (grid and search).
BASELINE_ATTR = "baseline"
LEARNING_CURVE_FILENAME = "learning_curve.json"
ENSEMBLE_STEM = "ensemble"  # study artifacts ensemble-<time>.json: the ensembles built from it


# --- Optuna internals ---------------------------------------------------------------------
# cso claims runs with one insert, beats hearts and stores results for trials it did not get
# from ``study.ask()``, and takes a PostgreSQL advisory lock on the storage's own engine. Optuna
# keeps the pieces for that private (a study's storage, a trial's storage id, the engine behind
# the cache). Every such use goes through these three functions: an upgrade has one place to look.


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage behind ``study`` (``Study._storage``; public on ``Trial`` as ``storage``)."""
    return study._storage


def trial_id_of(trial: optuna.Trial) -> int:
    """The storage id of a live trial (``Trial._trial_id``), which storage calls take."""
    return trial._trial_id


def engine_of(storage: BaseStorage) -> Any:
    """The SQLAlchemy engine of an RDB storage (studies wrap it in a cache: ``_backend``)."""
    backend: Any = getattr(storage, "_backend", storage)
    return backend.engine


_URL_PASSWORD = re.compile(r"(?P<head>://[^/@:]*:)[^/]*@")  # to the last @: raw @ in passwords
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:password|passwd)=)[^&#\s]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its password shown as ``***``: the only form a storage URL leaves cso in.

    A password in the URL (``user:secret@host``) or in its query (``?password=secret``) never
    reaches a line cso prints or a file it writes.
    """
    redacted = _URL_PASSWORD.sub(r"\g<head>***@", url)
    return _QUERY_PASSWORD.sub(r"\g<head>***", redacted)


def hide_password(text: str, url: str | None = None) -> str:
    """``text`` with every URL password in it masked (:func:`redact_url`) and, given the
    storage ``url`` it is about, that URL's password wherever it appears on its own."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    text = redact_url(text)
    if not url:
        return text
    try:
        parts = urlsplit(url)
        secrets = [parts.password or ""]
        secrets += [v for k, v in parse_qsl(parts.query) if k.lower() in ("password", "passwd")]
    except ValueError:
        secrets = []
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***").replace(unquote(secret), "***")
    return text


@contextlib.contextmanager
def passwords_hidden(url: str | None) -> Iterator[None]:
    """Re-raise cso's errors raised inside with ``url``'s password hidden (they are printed)."""
    try:
        yield
    except CsoError as exc:
        message = hide_password(str(exc), url)
        if message == str(exc):
            raise
        raise type(exc)(message) from None


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


STALE_TRIAL_RETRIES = 2
DB_POOL_SIZE = 3
DB_MAX_OVERFLOW = 1  # so one worker holds at most 4 connections to a database server


def heartbeat_interval_s() -> int:
    """Seconds between heartbeats: 5, or ``CSO_HEARTBEAT_INTERVAL`` (tests use 1)."""
    value = os.environ.get("CSO_HEARTBEAT_INTERVAL", "5")
    return int(value) if value.isdigit() and int(value) > 0 else 5


def grace_period_s() -> int:
    """A trial silent this long belongs to a dead worker: it is failed and its run taken up."""
    return 4 * heartbeat_interval_s()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers and one writer work at once: workers sharing a file wait less and never
    # see "database is locked" from a reader blocking a writer. NORMAL sync is safe with WAL.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


_SQLITE_SCHEME = re.compile(r"^sqlite(\+\w+)?://", re.IGNORECASE)


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for any other database.

    Raises:
        StudyError: an in-memory SQLite database (``sqlite://``, ``sqlite:///:memory:``): it
            is lost when cso exits, and its workers (other processes) could never share it.
    """
    match = _SQLITE_SCHEME.match(url)
    if match is None:
        return None
    rest = url[match.end() :]
    database, _, query = rest.partition("?")
    database = database[1:] if database.startswith("/") else database  # sqlite:///x.db: x.db
    if (
        database in ("", ":memory:")
        or database.startswith("file::memory:")
        or ("mode=memory" in query)
    ):
        raise StudyError(
            f"--storage {redact_url(url)}: an in-memory database is lost when cso exits (and "
            "its workers cannot share it); use a file: sqlite:///path.db"
        )
    return Path(database)


def check_storage(url: str) -> None:
    """Refuse, before any work, a storage no run can use: an in-memory SQLite database, or a
    SQLite file where a folder is, or under a file. (A server database shows when opened.)

    Raises:
        StudyError, ConfigError: naming ``--storage``, the URL (password hidden) and the reason.
    """
    from calling_score_opt.atomic import check_output_file

    path = _sqlite_file(url)
    if path is not None:
        check_output_file(path, "--storage")


def _create_storage(
    url: str, engine_kwargs: dict[str, Any], heartbeat_kwargs: dict[str, Any]
) -> RDBStorage:
    """RDBStorage, safe when several workers create the same new database at once.

    Optuna creates its tables on first use; two processes doing that together make one fail
    with "table ... already exists". SQLite workers take turns through a file lock; a server
    database gets a few retries instead (the tables are there by then).
    """
    import optuna
    import sqlalchemy.exc
    from filelock import FileLock

    database = _sqlite_file(url)  # raises for an in-memory one, before any lock file is made
    if database is not None and url.startswith(_SQLITE_PREFIX):
        with FileLock(f"{database}.init.lock"):
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat_kwargs)
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat_kwargs)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            if "already exists" not in str(exc) and "duplicate" not in str(exc).lower():
                raise
            time.sleep(0.2 * (attempt + 1))
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat_kwargs)


class StudyLocation:
    """For settings that name a study: its storage URL and artifact folder, defaults applied."""

    study_name: str
    storage_url: str | None  # None: sqlite:///studies/<study>.db
    artifact_dir: Path | None  # None: beside the SQLite file

    @property
    def storage(self) -> str:
        return self.storage_url or default_storage_url(self.study_name)

    @property
    def artifacts(self) -> Path:
        return self.artifact_dir or default_artifact_dir(self.storage, self.study_name)


def open_storage(url: str, heartbeat: bool = False, retry_stale: bool = True) -> RDBStorage:
    """An RDB storage for ``url`` (SQLite or PostgreSQL), creating a SQLite file's folder.

    ``heartbeat`` turns on Optuna's heartbeats: a running trial whose worker stops beating for
    :func:`grace_period_s` is marked failed and, with ``retry_stale``, queued again (up to
    ``STALE_TRIAL_RETRIES`` times; a grid takes failed runs up itself instead).
    """
    import warnings

    import optuna
    import sqlalchemy.exc
    from optuna.exceptions import ExperimentalWarning
    from sqlalchemy import event

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # cso reports trials itself
    engine_kwargs: dict[str, Any] = {}
    database = _sqlite_file(url)  # refuses an in-memory database
    sqlite = database is not None
    if database is not None:
        check_storage(url)  # a folder in the way: one line, not "unable to open database file"
        database.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}  # wait for a busy writer, don't fail
    else:
        # A worker needs at most 3 connections at once (its work, the claim lock, the
        # heartbeat thread): a small pool keeps many workers under the server's limit
        # (PostgreSQL's default max_connections is 100; see docs/workers.md).
        engine_kwargs.update(
            pool_size=DB_POOL_SIZE, max_overflow=DB_MAX_OVERFLOW, pool_pre_ping=True
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats are "experimental"
            heartbeat_kwargs: dict[str, Any] = {}
            if heartbeat:
                heartbeat_kwargs = {
                    "heartbeat_interval": heartbeat_interval_s(),
                    "grace_period": grace_period_s(),
                }
            if heartbeat and retry_stale:
                heartbeat_kwargs["heartbeat_stale_trial_callback"] = (
                    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=STALE_TRIAL_RETRIES)
                )
            storage = _create_storage(url, engine_kwargs, heartbeat_kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StudyError(
            f"--storage {redact_url(url)}: cannot open ({redact_url(reason)}); use "
            "sqlite:///path.db or postgresql://user:password@host/db"
        ) from exc
    if sqlite:
        event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # connections made from here on get the pragmas
    _OPEN_ENGINES.append(storage.engine)
    return storage


_OPEN_ENGINES: list[Any] = []


def close_storages() -> None:
    """Close the database connections of every storage this process opened (each command
    does as it ends: a connection left to the garbage collector is a server slot held open)."""
    while _OPEN_ENGINES:
        with contextlib.suppress(Exception):
            _OPEN_ENGINES.pop().dispose()


def open_study(
    storage: BaseStorage,
    name: str,
    identity: Mapping[str, Any],
    metric_names: Sequence[str] = ("val_loss",),
) -> optuna.Study:
    """Create the study, or load it when ``identity`` (data fingerprint, seed, ...) matches.

    ``metric_names`` name the objectives for Optuna's own tools (optuna-dashboard, plots).

    Raises:
        StudyError: the stored study was made with different ``identity`` values.
    """
    import warnings

    import optuna
    from optuna.exceptions import ExperimentalWarning

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
    if study.metric_names != list(metric_names):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names(list(metric_names))
    return study


def start_trial(
    study: optuna.Study,
    *,
    params: Mapping[str, Any],
    distributions: Mapping[str, BaseDistribution],
    user_attrs: Mapping[str, Any],
) -> int:
    """Create a RUNNING trial with its parameters in one insert; returns its storage id.

    A RUNNING trial is how a worker claims a run: others see it and leave the run alone while
    its heartbeat is fresh (see :func:`beating`).
    """
    import optuna
    from optuna.trial import TrialState

    storage = storage_of(study)
    template = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        params=dict(params),
        distributions=dict(distributions),
        user_attrs=dict(user_attrs),
    )
    trial_id = storage.create_new_trial(
        storage.get_study_id_from_name(study.study_name), template_trial=template
    )
    with contextlib.suppress(AttributeError):  # storages without heartbeats
        storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
    return trial_id


def finish_trial(
    study: optuna.Study,
    trial_id: int,
    *,
    value: float | None,
    user_attrs: Mapping[str, Any],
    artifact_store: FileSystemArtifactStore | None = None,
    checkpoint: bytes | None = None,
    history: Sequence[tuple[int, float, float]] = (),
) -> FrozenTrial:
    """Store a run's results on its RUNNING trial and finish it (``value`` None: failed).

    ``history`` (epoch, train loss, val loss) becomes the trial's learning_curve.json. The
    artifacts are stored before the state changes: a crash in between leaves a RUNNING trial
    (failed by the heartbeat, then retrained), never a complete one without weights.
    """
    from optuna.trial import TrialState

    storage = storage_of(study)
    for key, attr in user_attrs.items():
        storage.set_trial_user_attr(trial_id, key, attr)
    if artifact_store is not None and (checkpoint is not None or history):
        frozen = storage.get_trial(trial_id)
        if checkpoint is not None:
            store_checkpoint(artifact_store, frozen, checkpoint, storage)
        if history:
            store_learning_curve(artifact_store, frozen, history, storage)
    if value is None:
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    else:
        storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])
    return storage.get_trial(trial_id)


def _upload(
    artifact_store: FileSystemArtifactStore,
    trial: optuna.Study | optuna.Trial | FrozenTrial,
    filename: str,
    content: bytes,
    mimetype: str,
    storage: BaseStorage | None,
) -> None:
    from optuna.artifacts import upload_artifact

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_bytes(content)
        upload_artifact(
            artifact_store=artifact_store,
            file_path=str(path),
            study_or_trial=trial,
            storage=storage,
            mimetype=mimetype,
        )


def fail_interrupted(
    study: optuna.Study,
    trial_id: int,
    *,
    retry: bool,
    reason: str = "interrupted (Ctrl-C or a stop signal)",
) -> None:
    """Fail a trial this process was running when it was interrupted (Ctrl-C, SIGTERM) or
    stopped by an error outside the trial (the storage, the disk), at once.

    Waiting for its heartbeat to go stale would hold the next run up for the grace period. With
    ``retry`` the same configuration is queued again (user attributes such as the baseline mark
    included), exactly as a stale trial is. Errors are swallowed: the process is on its way
    out, and a trial left RUNNING is still failed by its heartbeat later.
    """
    import optuna
    from optuna.trial import TrialState

    storage = storage_of(study)
    with contextlib.suppress(Exception):
        frozen = storage.get_trial(trial_id)
        if frozen.state != TrialState.RUNNING:
            return
        storage.set_trial_user_attr(trial_id, "error", reason)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        if retry:
            history = [*frozen.system_attrs.get("retry_history", []), frozen.number]
            study.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.WAITING,
                    params=frozen.params,
                    distributions=frozen.distributions,
                    user_attrs={
                        k: v for k, v in frozen.user_attrs.items() if k != "pruned_at_epoch"
                    },
                    system_attrs={
                        **frozen.system_attrs,
                        "failed_trial": frozen.number,
                        "retry_history": history,
                    },
                )
            )


def store_checkpoint(
    artifact_store: FileSystemArtifactStore,
    trial: optuna.Trial | FrozenTrial,
    checkpoint: bytes,
    storage: BaseStorage | None = None,
) -> None:
    """Attach ``checkpoint`` (the weights) to a running trial as its model.pt artifact."""
    _upload(
        artifact_store, trial, CHECKPOINT_FILENAME, checkpoint, "application/octet-stream", storage
    )


def store_learning_curve(
    artifact_store: FileSystemArtifactStore,
    trial: optuna.Trial | FrozenTrial,
    history: Sequence[tuple[int, float, float]],
    storage: BaseStorage | None = None,
) -> None:
    """Attach a run's ``(epoch, train_loss, val_loss)`` history as learning_curve.json.

    One artifact per run, not one attribute per epoch: Optuna writes each intermediate value on
    its own (about 1 ms each), and long lists in user attributes flood ``optuna trials``.
    """
    document = {
        "epoch": [int(h[0]) for h in history],
        "train_loss": [float(h[1]) for h in history],
        "val_loss": [float(h[2]) for h in history],
    }
    content = json.dumps(document, separators=(",", ":")).encode()
    _upload(artifact_store, trial, LEARNING_CURVE_FILENAME, content, "application/json", storage)


def study_identity(kind: str, dataset: Dataset, split_seed: int, epochs: int) -> dict[str, Any]:
    """What a grid or search study is bound to: a rerun that differs in these is refused.

    The data fingerprint fixes the features too; their names travel in every checkpoint and
    ONNX file instead of filling the study's attributes (``optuna studies`` shows them all).
    """
    return {
        "kind": kind,
        "data_fingerprint": dataset.fingerprint,
        "split_seed": split_seed,
        "epochs": epochs,
    }


@contextlib.contextmanager
def beating(storage: BaseStorage, trial_ids: set[int]) -> Iterator[None]:
    """Record a heartbeat for every trial id in ``trial_ids`` (a live set) while in the block.

    A worker that dies stops beating; after :func:`grace_period_s` any other worker's
    ``fail_stale_trials`` marks its trials failed, so their runs are taken up again.
    """
    stop = threading.Event()

    def beat_all() -> None:
        for trial_id in list(trial_ids):
            with contextlib.suppress(Exception):  # a missed beat is not worth a crash
                storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]

    def beat() -> None:
        while not stop.wait(heartbeat_interval_s()):
            beat_all()

    # At once, too: a trial with no heartbeat at all is never found stale by Optuna.
    beat_all()
    thread = threading.Thread(target=beat, name="cso-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def claim_lock(storage_url: str, study_name: str, storage: BaseStorage) -> Any:
    """A lock that makes "look at the study, then claim a run" atomic across workers.

    SQLite: a file lock beside the database (workers on one machine). PostgreSQL: a session
    advisory lock keyed by the study name (workers on many machines). Other databases: none.
    """
    from filelock import FileLock

    database = _sqlite_file(storage_url)  # raises for an in-memory one: no stray lock file
    if database is not None and storage_url.startswith(_SQLITE_PREFIX):
        return FileLock(f"{database}.lock")
    if storage_url.startswith("postgresql"):
        return _AdvisoryLock(storage, study_name)
    return contextlib.nullcontext()


class _AdvisoryLock:
    """A PostgreSQL session advisory lock, reusable like a FileLock."""

    def __init__(self, storage: BaseStorage, study_name: str) -> None:
        digest = hashlib.sha256(f"cso:{study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        self._engine = engine_of(storage)
        self._connection: Any = None

    def __enter__(self) -> _AdvisoryLock:
        from sqlalchemy import text

        self._connection = self._engine.connect()
        try:
            self._connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
        except BaseException:  # a dropped connection or Ctrl-C while waiting: give it back
            self._connection.close()
            self._connection = None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        from sqlalchemy import text

        try:
            self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
            self._connection.commit()
        finally:
            self._connection.close()
            self._connection = None


def artifact_store(directory: Path) -> FileSystemArtifactStore:
    from optuna.artifacts import FileSystemArtifactStore

    directory.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(directory))


#: Where, in a study's artifact folder, its parsed data file is cached (data.load_dataset).
DATA_CACHE_DIR = "data-cache"


def artifact_dir_of(store: FileSystemArtifactStore) -> Path:
    """The folder a file-system artifact store keeps its files in."""
    return Path(store._base_path)  # private, but the store has no public name for it


def _read_artifact(
    store: FileSystemArtifactStore,
    storage: BaseStorage,
    owner: optuna.Study | FrozenTrial,
    filename: str,
) -> bytes | None:
    """The newest artifact called ``filename`` of a trial or study; None when it has none.

    Raises:
        StudyError: the owner lists the artifact but its file is gone from the folder.
    """
    from optuna.artifacts import download_artifact, get_all_artifact_meta

    metas = [m for m in get_all_artifact_meta(owner, storage=storage) if m.filename == filename]
    if not metas:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        try:
            download_artifact(
                artifact_store=store, file_path=str(path), artifact_id=metas[-1].artifact_id
            )
        except Exception as exc:  # the store raises its own not-found type, or OSError
            whose = f"trial {owner.number}" if hasattr(owner, "number") else "the study"
            raise StudyError(
                f"{whose}: its {filename} ({metas[-1].artifact_id}) is missing from "
                "the artifact folder; pass the right --artifacts folder or retrain"
            ) from exc
        return path.read_bytes()


def read_checkpoint(
    store: FileSystemArtifactStore, storage: BaseStorage, trial: FrozenTrial
) -> bytes:
    """The weights stored with ``trial``.

    Raises:
        StudyError: the trial has no stored weights, or their file is gone.
    """
    checkpoint = _read_artifact(store, storage, trial, CHECKPOINT_FILENAME)
    if checkpoint is None:
        raise StudyError(f"trial {trial.number} has no stored weights; it must be retrained")
    return checkpoint


def read_learning_curve(
    store: FileSystemArtifactStore, storage: BaseStorage, trial: FrozenTrial
) -> dict[str, list[float]] | None:
    """The learning_curve.json stored with ``trial`` (keys epoch, train_loss, val_loss), if any."""
    try:
        content = _read_artifact(store, storage, trial, LEARNING_CURVE_FILENAME)
    except StudyError:
        return None  # a lost curve is not worth failing a report over
    if content is None:
        return None
    try:
        document = json.loads(content)
    except ValueError:
        return None
    if not isinstance(document, dict) or not all(
        isinstance(document.get(k), list) for k in ("epoch", "train_loss", "val_loss")
    ):
        return None
    return {k: document[k] for k in ("epoch", "train_loss", "val_loss")}


def store_study_json(
    artifact_store: FileSystemArtifactStore,
    study: optuna.Study,
    stem: str,
    document: Mapping[str, Any],
) -> None:
    """Attach ``document`` to the study as ``<stem>-<UTC time>.json``: the newest one wins.

    Optuna keeps no order among a study's artifacts, so the name carries it.
    """
    from datetime import UTC, datetime

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    content = json.dumps(document, indent=1).encode()
    _upload(
        artifact_store,
        study,
        f"{stem}-{stamp}.json",
        content,
        "application/json",
        storage_of(study),
    )


def read_study_json(
    store: FileSystemArtifactStore, study: optuna.Study, stem: str
) -> dict[str, Any] | None:
    """The newest JSON artifact stored by :func:`store_study_json` under ``stem``; or None.

    Raises:
        StudyError: it is listed but its file is gone or is not a JSON object.
    """
    from optuna.artifacts import get_all_artifact_meta

    names = [
        m.filename
        for m in get_all_artifact_meta(study, storage=storage_of(study))
        if m.filename.startswith(f"{stem}-") and m.filename.endswith(".json")
    ]
    if not names:
        return None
    newest = max(names)
    content = _read_artifact(store, storage_of(study), study, newest)
    if content is None:  # pragma: no cover - listed a moment ago
        return None
    try:
        document = json.loads(content)
    except ValueError as exc:
        raise StudyError(f"the study's {newest} is damaged ({exc}); build it again") from exc
    if not isinstance(document, dict):
        raise StudyError(f"the study's {newest} is not a JSON object; build it again")
    return document
