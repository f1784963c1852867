"""Many workers on one study (SQLite and a real PostgreSQL server), and workers that get killed.

PostgreSQL tests use the server in ``CSO_TEST_POSTGRES_URL`` (``.ci/run`` starts one); without
it they skip locally, and fail in CI, where a missing server is a broken setup.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import onnx
import optuna
import pytest
from helpers import postgres_url_or_skip
from optuna.trial import TrialState

from calling_score_opt.space import VARIANTS
from calling_score_opt.study import open_storage
from calling_score_opt.synth import write_synthetic


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/studies/shared.db"
    return postgres_url_or_skip()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.json"
    write_synthetic(path, 300, 11)
    return path


_started: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_stray_workers() -> Iterator[None]:
    yield
    while _started:  # a failed test must not leave workers running
        process = _started.pop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def _cso(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "calling_score_opt.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CSO_HEARTBEAT_INTERVAL": "1", **(env or {})},
        start_new_session=True,
    )
    _started.append(process)
    return process


def _finish(process: subprocess.Popen[str], timeout: float = 240) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    _started.remove(process)
    assert process.returncode == 0, err
    assert "Traceback" not in out + err
    return out, err


@functools.cache
def _storage(url: str) -> optuna.storages.RDBStorage:
    # cso's own opener (it takes the same table-creation lock as the workers), once per URL:
    # every storage holds a connection pool, and polling must not exhaust the server's slots.
    return open_storage(url)


def _load(storage: str, study: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=_storage(storage))


def _study_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"  # one PostgreSQL database serves every test


def test_three_search_workers_finish_with_exactly_n_trials(
    storage_url: str, data: Path, tmp_path: Path
) -> None:
    study = _study_name()
    args = (
        "search",
        "--data-path",
        data,
        "--trials",
        "9",
        "--epochs",
        "4",
        "--study",
        study,
        "--storage",
        storage_url,
        "--artifacts",
        tmp_path / "art",
        "--quiet",
    )
    workers = [_cso(*args) for _ in range(3)]
    for worker in workers:
        _finish(worker)
    trials = _load(storage_url, study).get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 9
    assert states[TrialState.FAIL] == 0
    assert states[TrialState.RUNNING] == 0


def test_three_grid_workers_train_each_variant_once(
    storage_url: str, data: Path, tmp_path: Path
) -> None:
    study = _study_name()
    workers = [
        _cso(
            "grid",
            "--data-path",
            data,
            "--epochs",
            "2",
            "--jobs",
            "1",
            "--study",
            study,
            "--storage",
            storage_url,
            "--artifacts",
            tmp_path / "art",
            "--output-dir",
            tmp_path / f"out{k}",
            "--quiet",
        )
        for k in range(3)
    ]
    for worker in workers:
        _finish(worker)
    trials = _load(storage_url, study).get_trials(deepcopy=False)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert Counter(t.user_attrs["variant"] for t in trials) == Counter(v.name for v in VARIANTS)
    trained = 0
    for k in range(3):
        results = json.loads((tmp_path / f"out{k}" / "optimization_results.json").read_text())
        assert all(v["success"] for v in results["variants"])
        assert len(list((tmp_path / f"out{k}").glob("*.onnx"))) == 15
        trained += results["summary"]["timing"]["runs_trained"]
    assert trained == 15  # the three workers split the work; nobody trained a variant twice


def _wait_for_running_trial(storage: str, study: str, min_epochs: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if storage.startswith("sqlite:///") and not Path(storage[10:]).exists():
            trials = []  # the worker has not created the database yet
        else:
            try:
                trials = _load(storage, study).get_trials(deepcopy=False)
            except KeyError:  # the study does not exist yet
                trials = []
        running = [
            t
            for t in trials
            if t.state == TrialState.RUNNING and len(t.intermediate_values) >= min_epochs
        ]
        if running:
            return running[0].number
        time.sleep(0.2)
    raise AssertionError("no trial got going in time")


def _kill(process: subprocess.Popen[str]) -> None:
    os.killpg(process.pid, signal.SIGKILL)  # the worker and anything it started
    process.communicate()
    _started.remove(process)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_killed_search_worker_s_trial_is_failed_and_retried(
    storage_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data.json"
    write_synthetic(data, 3000, 5)
    study = _study_name()
    args = (
        "search",
        "--data-path",
        data,
        "--trials",
        "4",
        "--epochs",
        "30",
        "--pruner",
        "none",
        "--study",
        study,
        "--storage",
        storage_url,
        "--artifacts",
        tmp_path / "art",
        "--quiet",
    )
    first = _cso(*args)
    killed = _wait_for_running_trial(storage_url, study, min_epochs=2, timeout=120)
    complete_before = {
        t.number: t.values
        for t in _load(storage_url, study).get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE
    }
    _kill(first)
    assert _load(storage_url, study).trials[killed].state == TrialState.RUNNING  # nobody told it

    _finish(_cso(*args))  # the same command again: it notices the silence and retries
    trials = _load(storage_url, study).get_trials(deepcopy=False)
    assert trials[killed].state == TrialState.FAIL
    retries = [
        t
        for t in trials
        if optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) == killed
    ]
    assert len(retries) == 1
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == trials[killed].params
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 4
    for number, values in complete_before.items():  # no completed trial was lost
        assert trials[number].state == TrialState.COMPLETE
        assert trials[number].values == values


def test_a_killed_grid_is_resumed_and_leaves_no_truncated_file(
    storage_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data.json"
    write_synthetic(data, 20_000, 5)
    study = _study_name()
    out = tmp_path / "out"
    args = (
        "grid",
        "--data-path",
        data,
        "--epochs",
        "15",
        "--jobs",
        "1",
        "--study",
        study,
        "--storage",
        storage_url,
        "--artifacts",
        tmp_path / "art",
        "--output-dir",
        out,
        "--max-variants",
        "2",
        "--quiet",
    )
    first = _cso(*args)
    killed = _wait_for_running_trial(
        storage_url, study, min_epochs=0, timeout=120
    )  # grid trials report at the end
    _kill(first)
    for path in out.glob("*.onnx"):  # whatever was there when it died is whole
        onnx.checker.check_model(str(path))

    _finish(_cso(*args))
    trials = _load(storage_url, study).get_trials(deepcopy=False)
    assert trials[killed].state == TrialState.FAIL  # stale heartbeat
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["variant"] for t in complete) == sorted(v.name for v in VARIANTS[:2])
    results = json.loads((out / "optimization_results.json").read_text())
    assert [v["success"] for v in results["variants"]] == [True] * 2
    for path in out.glob("*.onnx"):
        onnx.checker.check_model(str(path))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [f"calling_score_model_{v.name}.onnx" for v in VARIANTS[:2]] + ["optimization_results.json"]
    )
