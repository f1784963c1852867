"""The report in a real browser: headless Chromium loads it offline, every plot renders, no
JavaScript error, and a screenshot that is not blank.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages separated by NUL bytes on file descriptors 3 and 4), so no extra Python package is
needed. Without /usr/bin/chromium the tests skip, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_report import (
    Built,
    built_grid,
    built_handmade,
    built_pareto,
    built_search,
    studies_base,
    write,
)

#: The Debian package's path first; CSO_CHROMIUM names another build (or Chrome) instead.
CANDIDATES = (
    [os.environ["CSO_CHROMIUM"]]
    if os.environ.get("CSO_CHROMIUM")
    else ["/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"]
)
IN_CI = os.environ.get("CI", "").lower() == "true"
RENDER_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def chromium_path() -> str:
    for candidate in CANDIDATES:
        found = candidate if Path(candidate).is_file() else shutil.which(candidate)
        if found:
            return found
    reason = f"no Chromium ({', '.join(CANDIDATES)}): install it (apt-get install chromium)"
    if IN_CI:
        pytest.fail(f"{reason}; CI must run the browser tests")
    pytest.skip(reason)


# --- a minimal DevTools-protocol client --------------------------------------------------------


class Browser:
    """Headless Chromium, spoken to over the DevTools pipe."""

    def __init__(self, executable: str, profile: Path) -> None:
        commands_r, commands_w = os.pipe()  # we write, Chromium reads on fd 3
        replies_r, replies_w = os.pipe()  # Chromium writes on fd 4, we read

        def onto_fds_3_and_4() -> None:  # runs in the child, between fork and exec
            import fcntl

            reads = fcntl.fcntl(commands_r, fcntl.F_DUPFD, 10)  # out of 3's and 4's way first
            writes = fcntl.fcntl(replies_w, fcntl.F_DUPFD, 10)
            os.dup2(reads, 3)
            os.dup2(writes, 4)

        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile / "chromium.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    executable,
                    "--headless",
                    "--remote-debugging-pipe",
                    "--no-sandbox",  # containers and CI runners run as root
                    "--disable-gpu",
                    "--enable-unsafe-swiftshader",  # software WebGL for parallel coordinates
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-extensions",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile}",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                close_fds=False,  # fds 3 and 4 must survive; ours are non-inheritable anyway
                preexec_fn=onto_fds_3_and_4,
            )
        os.close(commands_r)
        os.close(replies_w)
        self._writer = os.fdopen(commands_w, "wb", buffering=0)
        self._reader = os.fdopen(replies_r, "rb", buffering=0)
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._reading = threading.Thread(target=self._read, daemon=True)
        self._reading.start()

    def _read(self) -> None:
        pending = b""
        while chunk := self._reader.read(1 << 16):
            pending += chunk
            *messages, pending = pending.split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))
        self._messages.put(None)  # the browser went away

    def _next(self, deadline: float) -> dict[str, Any]:
        try:
            message = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"Chromium did not answer in time; log: {self.log}") from None
        if message is None:
            log = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Chromium exited; its log ends:\n{log}")
        return message

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._writer.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        while True:
            found = [e for e in self.events if e.get("method") == method]
            if found:
                return found[0]
            self.events.append(self._next(deadline))

    def drain(self) -> None:
        while not self._messages.empty():
            message = self._messages.get_nowait()
            if message is not None:
                self.events.append(message)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._writer.close()
        self._reading.join(timeout=10)  # the pipe's end: the reader stops by itself
        self._reader.close()


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Browser]:
    with tempfile.TemporaryDirectory(prefix="cso-chromium-") as profile:
        chromium = Browser(chromium_path, Path(profile))
        try:
            yield chromium
        finally:
            chromium.close()


# --- PNG, read with zlib and numpy --------------------------------------------------------------


def png_pixels(data: bytes) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """An 8-bit RGB or RGBA PNG as an array (height, width, channels)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, compressed = 8, b""
    width = height = channels = 0
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            compressed += body
    stride = width * channels
    rows = np.frombuffer(zlib.decompress(compressed), np.uint8).reshape(height, stride + 1)
    image = np.zeros((height, stride), np.int32)
    previous = np.zeros(stride, np.int32)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if kind == 0:
            row = line
        elif kind == 2:  # up
            row = (line + previous) & 0xFF
        elif kind == 1:  # sub: a running sum per channel
            row = np.cumsum(line.reshape(width, channels), axis=0).reshape(stride) & 0xFF
        else:  # average, paeth: each byte needs the one just decoded
            row = line.copy()
            for x in range(stride):
                a = int(row[x - channels]) if x >= channels else 0
                b = int(previous[x])
                if kind == 3:
                    row[x] = (row[x] + (a + b) // 2) & 0xFF
                else:
                    c = int(previous[x - channels]) if x >= channels else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    near = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                    row[x] = (row[x] + near) & 0xFF
        image[y] = row
        previous = row
    return image.reshape(height, width, channels).astype(np.uint8)


def test_png_reader_reads_every_filter() -> None:
    pixels = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 120]]], np.uint8)
    raw = pixels.reshape(2, 6).astype(np.int32)
    for kind in range(5):
        filtered = []
        previous = np.zeros(6, np.int32)
        for row in raw:
            left = np.concatenate([np.zeros(3, np.int32), row[:-3]])
            up_left = np.concatenate([np.zeros(3, np.int32), previous[:-3]])
            if kind == 0:
                out = row
            elif kind == 1:
                out = row - left
            elif kind == 2:
                out = row - previous
            elif kind == 3:
                out = row - (left + previous) // 2
            else:
                p = left + previous - up_left
                pa, pb, pc = abs(p - left), abs(p - previous), abs(p - up_left)
                near = np.where(
                    (pa <= pb) & (pa <= pc), left, np.where(pb <= pc, previous, up_left)
                )
                out = row - near
            filtered.append(bytes([kind]) + bytes((out & 0xFF).astype(np.uint8)))
            previous = row
        chunks = [
            (b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)),
            (b"IDAT", zlib.compress(b"".join(filtered))),
            (b"IEND", b""),
        ]
        data = b"\x89PNG\r\n\x1a\n" + b"".join(
            struct.pack(">I", len(body)) + kind_ + body + b"\0\0\0\0" for kind_, body in chunks
        )
        assert (png_pixels(data) == pixels).all(), kind


# --- opening a report ---------------------------------------------------------------------------

#: Per plot element: plotly drew it (an svg with content) and how many traces it holds.
RENDERED = """
JSON.stringify([...document.querySelectorAll('.js-plotly-plot')].map(div => ({
    id: div.id,
    svgs: div.querySelectorAll('svg.main-svg').length,
    drawn: div.querySelectorAll(
        'svg.main-svg .trace, svg.main-svg .bars path, .parcoords .y-axis').length,
    traces: (div._fullData || []).length,
    expected: (div.data || []).length,
    box: div.getBoundingClientRect().height,
})))
"""


def open_report(browser: Browser, path: Path) -> dict[str, Any]:
    """Load ``path`` in a new tab; return what rendered, the errors, the requests, a screenshot."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
        "sessionId"
    ]
    browser.events.clear()
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        session=session,
    )
    browser.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
    browser.wait_for("Page.loadEventFired")
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while True:  # plotly draws right after load; wait until every plot has its traces
        reply = browser.send(
            "Runtime.evaluate", {"expression": RENDERED, "returnByValue": True}, session
        )
        plots = json.loads(reply["result"]["value"])
        if plots and all(p["svgs"] and p["traces"] == p["expected"] for p in plots):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    shot = browser.send(
        "Page.captureScreenshot",
        {"format": "png", "captureBeyondViewport": True, "optimizeForSpeed": True},
        session,
    )
    browser.drain()
    events = [e for e in browser.events if e.get("sessionId") == session]
    browser.send("Target.closeTarget", {"targetId": target})
    errors = [
        e["params"]["exceptionDetails"].get("exception", {}).get("description")
        or e["params"]["exceptionDetails"].get("text")
        for e in events
        if e["method"] == "Runtime.exceptionThrown"
    ]
    errors += [
        " ".join(str(a.get("value", a.get("description"))) for a in e["params"]["args"])
        for e in events
        if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")
    ]
    errors += [
        e["params"]["entry"]["text"]
        for e in events
        if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
    ]
    requests = [
        e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"
    ]
    return {
        "plots": plots,
        "errors": errors,
        "requests": requests,
        "png": base64.b64decode(shot["data"]),
    }


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    base = studies_base(tmp_path_factory)
    return {
        "grid": built_grid(base),
        "search": built_search(base),
        "pareto": built_pareto(base),
        "handmade": built_handmade(base),  # stored learning curves and an ensemble
    }


@pytest.mark.parametrize("kind", ["grid", "search", "pareto", "handmade"])
def test_every_plot_renders_offline_without_errors(
    kind: str, studies: dict[str, Built], browser: Browser, tmp_path: Path
) -> None:
    outcome = write(studies[kind], tmp_path / f"{kind}.html")
    page = open_report(browser, outcome.path)

    assert page["errors"] == [], page["errors"]
    offline = [u for u in page["requests"] if not u.startswith(("file:", "data:", "blob:"))]
    assert offline == [], f"the report loaded from the network: {offline}"

    plots = {p["id"]: p for p in page["plots"]}
    assert tuple(plots) == outcome.plots  # every plot, in page order, and nothing else
    for plot_id, plot in plots.items():
        assert plot["svgs"] >= 1, plot_id
        assert plot["traces"] == plot["expected"] >= 1, plot
        assert plot["drawn"] >= 1, plot
        assert plot["box"] >= 250, plot  # laid out with a real height

    pixels = png_pixels(page["png"])
    height, width, _ = pixels.shape
    assert width == 1280 and height > 2500  # the whole page, not the first screen
    rgb = pixels[..., :3].reshape(-1, 3)
    colours = len(np.unique(rgb[:: max(1, len(rgb) // 200_000)], axis=0))
    not_white = float((rgb.min(axis=1) < 245).mean())
    assert colours > 50, f"screenshot has only {colours} colours"
    assert not_white > 0.03, f"screenshot is {1 - not_white:.1%} white"


def test_pruned_trials_reach_the_browser_cut_short(
    studies: dict[str, Built], browser: Browser, tmp_path: Path
) -> None:
    outcome = write(studies["search"], tmp_path / "search.html")
    target = browser.send("Target.createTarget", {"url": outcome.path.resolve().as_uri()})
    session = browser.send(
        "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
    )["sessionId"]
    expression = """
        (() => {
            const div = document.getElementById('plot-learning-curves');
            if (!div || !div._fullData) return null;
            return JSON.stringify(div._fullData.map(t => [t.name, t.line.dash, t.x.length]));
        })()
    """
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    value = None
    while value is None and time.monotonic() < deadline:
        reply = browser.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        value = reply["result"].get("value")
        time.sleep(0.1)
    browser.send("Target.closeTarget", {"targetId": target["targetId"]})
    assert value is not None, "the learning curves never rendered"
    traces = json.loads(value)
    pruned = [t for t in traces if t[0] == "pruned"]
    complete = [t for t in traces if t[0] in ("complete", "baseline")]
    train = [t for t in traces if t[0].endswith("(train)")]
    assert pruned and complete and train
    assert all(dash == "solid" for _, dash, _ in pruned + complete)  # validation: solid
    assert all(dash == "dash" for _, dash, _ in train)  # training: dashed
    longest_complete = max(n for _, _, n in complete)
    assert all(n < longest_complete for _, _, n in pruned)
