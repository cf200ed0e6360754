"""The report in a real browser: Debian's headless Chromium loads it and the summary and figures render.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages ending
in NUL on file descriptors 3 and 4), which needs no driver binary, no port and no extra package.
`make test-browser` (and `make test`) install Debian's chromium when it is missing. The screenshot is
kept under the test's tmp dir and, when FLOWOOD_ARTIFACTS is set, copied there.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import Image

from flowood_ray.scoring.calibration import calibrate
from flowood_ray.scoring.metrics import evaluate_table
from flowood_ray.scoring.report import FaceMap, ModelLine, RunSummary, auroc_colour, write_report

VIEWPORT = (1440, 900)
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--remote-debugging-pipe", "--hide-scrollbars",
)
TIMEOUT_S = 120.0


def _above_four(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
    os.close(fd)
    return moved


class DevTools:
    """One headless Chromium with a fresh profile, spoken to over the DevTools pipe."""

    def __init__(self, profile: Path) -> None:
        binary = shutil.which("chromium")
        if binary is None:
            pytest.fail("Debian's chromium is not installed: run `make test-browser`, which installs it")
        # Above 4, so that putting one pipe end on fd 3 or 4 in the child cannot overwrite the other.
        to_browser_read, self._to_browser = (_above_four(fd) for fd in os.pipe())
        self._from_browser, from_browser_write = (_above_four(fd) for fd in os.pipe())

        def use_pipe_fds() -> None:  # in the child: DevTools reads fd 3 and writes fd 4
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        self.process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=use_pipe_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self._deadline = time.monotonic() + TIMEOUT_S

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = self._deadline - time.monotonic()
            readable, _, _ = select.select([self._from_browser], [], [], max(remaining, 0.0))
            if not readable:
                pytest.fail(f"Chromium did not answer within {TIMEOUT_S:.0f} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                pytest.fail(f"Chromium closed the DevTools pipe (exit code {self.process.poll()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    pytest.fail(f"DevTools {method} failed: {reply['error']}")
                return reply["result"]
            self._events.append(reply)

    def wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self._events):
            self._events.append(self._receive())

    def close(self) -> None:
        self.call("Browser.close")
        self.process.wait(timeout=30)
        os.close(self._to_browser)
        os.close(self._from_browser)


def _faces() -> list[FaceMap]:
    """Astronaut crops (a real face photo) with a map hot where the hand-drawn mask is."""
    photo = skimage.data.astronaut()
    faces = []
    for i, (top, left) in enumerate([(30, 160), (40, 170), (20, 150)]):
        crop = np.ascontiguousarray(photo[top : top + 160 : 2, left : left + 160 : 2])
        mask = np.zeros(crop.shape[:2], dtype=bool)
        mask[25:60, 20:60] = True
        heatmap = mask.astype(np.float64) + np.random.default_rng(i).normal(0, 0.2, mask.shape)
        faces.append(FaceMap("flowood-vqvae/1 vq_restoration", f"fake #{i}", crop, heatmap, mask))
    return faces


def _report(directory: Path) -> tuple[Path, list[dict[str, Any]]]:
    rng = np.random.default_rng(0)
    methods = np.array(["real"] * 30 + ["Deepfakes"] * 15 + ["FaceSwap"] * 15, dtype=object)
    labels = (methods != "real").astype(int)
    video = {"video_id": np.array([f"v{i}" for i in range(labels.size)]), "label": labels, "method": methods}
    video["nll"] = rng.normal(size=labels.size) + 3.0 * labels  # well separated: a green cell
    video["recon"] = rng.normal(size=labels.size) - 1.0 * labels  # ranks the wrong way: a red cell
    frame = {key: np.repeat(values, 4) for key, values in video.items()}
    frame["nll"] = frame["nll"] + rng.normal(0, 0.5, size=frame["nll"].size)
    tables = {"video": video, "frame": frame}
    metrics = [r for level, t in tables.items() for r in evaluate_table(t, level, ["nll", "recon"], n_boot=20)]
    calibrations = [*calibrate({"nll": rng.normal(size=100)}, "video").values()]
    summary = RunSummary(
        [ModelLine("flowood-glow", "2", "glow", "nll", {"video": "100 real videos"})], "nll", 0.01, calibrations[0].thresholds[0.01],
        {"real": {"real": 29, "fake": 1}, "Deepfakes": {"fake": 14, "real": 1}, "FaceSwap": {"fake": 15}},
    )
    localization = [{"model": "flowood-vqvae/1", "score": "vq_restoration", "subset": "all", "images": 3,
                     "pixel_auroc": 0.9, "aupro": 0.6, "reason": None}]
    path = write_report(directory / "report.html", metrics, tables, _faces(), title="browser check",
                        calibrations=calibrations, summary=summary, localization_rows=localization)
    return path, metrics


PAGE_STATE = """JSON.stringify({
  images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth})),
  grid: (() => { const r = document.querySelector('#auroc-grid').getBoundingClientRect();
                 return {top: r.top, bottom: r.bottom, left: r.left, right: r.right}; })(),
  summaryBottom: document.querySelector('#summary').getBoundingClientRect().bottom,
  cells: Array.from(document.querySelectorAll('#auroc-grid td[data-auroc]')).map(td => {
    const r = td.getBoundingClientRect();
    return {auroc: Number(td.dataset.auroc), x: r.left + 4, y: r.top + r.height / 2}; }),
  tablesShown: document.querySelector('#metric-tables table').checkVisibility(),
  viewport: [innerWidth, innerHeight],
})"""


def test_summary_and_figures_render_in_chromium(tmp_path: Path) -> None:
    # Catches what an HTML parser cannot: PNGs that do not decode, a summary that needs scrolling at
    # 1440x900, grid colours the browser does not paint, and collapsed tables that still show.
    report, metrics = _report(tmp_path)
    browser = DevTools(tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False}, session)
        browser.call("Page.enable", None, session)
        browser.call("Page.navigate", {"url": report.as_uri()}, session)
        browser.wait_for("Page.loadEventFired")
        state = json.loads(browser.call("Runtime.evaluate", {"expression": PAGE_STATE, "returnByValue": True},
                                        session)["result"]["value"])
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session)["data"]
    finally:
        browser.close()
    png = base64.b64decode(shot)
    (tmp_path / "report.png").write_bytes(png)
    if os.environ.get("FLOWOOD_ARTIFACTS"):
        artifacts = Path(os.environ["FLOWOOD_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "report.png", artifacts / "report_browser.png")

    assert state["viewport"] == list(VIEWPORT)
    # 2 scores x 2 levels of figures and 3 faces, every one decoded by the browser.
    assert len(state["images"]) == 2 * 2 + 3
    assert all(image["complete"] and image["width"] > 0 for image in state["images"])
    assert 0 <= state["grid"]["top"] and state["summaryBottom"] <= VIEWPORT[1]
    assert state["tablesShown"] is False

    screenshot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert screenshot.shape[:2] == (VIEWPORT[1], VIEWPORT[0])
    video_aurocs = sorted(r["auroc"] for r in metrics if r["level"] == "video")
    assert len(state["cells"]) == len(video_aurocs) and video_aurocs[0] < 0.3 and video_aurocs[-1] > 0.9
    for cell in state["cells"]:
        painted = screenshot[round(cell["y"]), round(cell["x"])]
        expected = np.array([int(auroc_colour(cell["auroc"])[k : k + 2], 16) for k in (1, 3, 5)])
        assert np.abs(painted - expected).max() <= 3, (cell, painted, expected)
