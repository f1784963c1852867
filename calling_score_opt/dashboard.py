"""``cso dashboard``: optuna-dashboard on a study's storage, its stored weights included.

A thin shell: the pages and the HTTP API are optuna-dashboard's own WSGI application; cso binds
the port first (so a port in use is one clear line, and the URL it prints is the real one),
serves it with the standard library's server, and stops quietly on Ctrl-C.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from calling_score_opt.errors import ConfigError
from calling_score_opt.study import default_artifact_dir, storage_of
from calling_score_opt.trials import load_study


class _QuietHandler(WSGIRequestHandler):
    """No line per request: the dashboard polls the API every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _IPv6Server(WSGIServer):
    address_family = socket.AF_INET6


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (127.0.0.1, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Dashboard:
    """A bound, not yet serving, dashboard: :func:`serve` runs it until Ctrl-C."""

    server: WSGIServer
    url: str  # the dashboard's home: every study in the storage
    study_url: str  # the study's own page
    artifact_dir: Path | None  # None: no stored weights to show
    stopping: threading.Event = field(default_factory=threading.Event)  # set: serve() returns


def open_dashboard(
    study_name: str,
    storage_url: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifact_dir: Path | None = None,
) -> Dashboard:
    """Check the study exists and bind ``host:port`` (port 0: any free port).

    ``artifact_dir`` None: the study's default folder, when it exists.

    Raises:
        StudyError: the storage has no such study.
        ConfigError: the artifact folder given does not exist, or the port cannot be bound.
    """
    import optuna_dashboard  # type: ignore[import-untyped]
    from optuna.artifacts import FileSystemArtifactStore

    study = load_study(storage_url, study_name)
    storage = storage_of(study)
    if artifact_dir is not None and not artifact_dir.is_dir():
        raise ConfigError(f"--artifacts {artifact_dir}: no such folder")
    folder = artifact_dir or default_artifact_dir(storage_url, study_name)
    store = FileSystemArtifactStore(str(folder)) if folder.is_dir() else None
    app = optuna_dashboard.wsgi(storage, artifact_store=store)
    server_class = _IPv6Server if ":" in host else WSGIServer
    try:
        server = make_server(host, port, app, server_class, _QuietHandler)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"cannot listen on {host}:{port} ({reason}); pass another --port (0 picks a free "
            "one) or --host"
        ) from exc
    server.timeout = _POLL_S
    shown_host = f"[{host}]" if ":" in host else host
    base = f"http://{shown_host}:{server.server_port}/dashboard"
    study_id = storage.get_study_id_from_name(study_name)
    return Dashboard(
        server=server,
        url=base,
        study_url=f"{base}/studies/{study_id}",
        artifact_dir=folder if store is not None else None,
    )


_POLL_S = 0.5  # how soon a stop request is noticed between requests


def serve(dashboard: Dashboard) -> None:
    """Answer requests until Ctrl-C or SIGTERM (or ``dashboard.stopping.set()``).

    A signal only asks the loop to stop, between requests: raised inside a request, the
    interrupt would be swallowed by wsgiref's error handler (a traceback, and no stop). A
    second Ctrl-C interrupts at once.
    """

    def ask_to_stop(signum: int, frame: Any) -> None:
        if dashboard.stopping.is_set():
            raise KeyboardInterrupt
        dashboard.stopping.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            previous[stop_signal] = signal.signal(stop_signal, ask_to_stop)
    try:
        while not dashboard.stopping.is_set():
            dashboard.server.handle_request()  # returns after _POLL_S without a request
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.server.server_close()
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)
