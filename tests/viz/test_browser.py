"""The inspect page in a real headless browser (Debian `chromium`): it loads, its DOM holds every token span,
and a screenshot is a non-trivial image. Skipped when chromium is not installed (CI installs it with
.ci/install-chromium.sh)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from creditlab.viz.html import render_page

CHROMIUM = next((p for p in (os.environ.get("CREDITLAB_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it with "
                                "`.ci/install-chromium.sh`; locally: apt-get install chromium)")
# Offline, sandbox-free headless flags: without them chromium tries the network or fails as root in containers.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1000,900"]


def _rows():
    rows = []
    for g in range(3):
        for k in range(3):
            toks = ["Step", " 1", ":", " 3", "+", "4", "=", "7", "\n", "<b>answer</b>", " ", "7"]
            advs = [(g - 1) * 0.4 + (k - 1) * 0.3 * (i % 4 - 1.5) for i in range(len(toks))]
            rows.append({"group": g, "reward": float(k % 2), "prompt": f"What is 3+4? (#{g})", "tokens": toks,
                         "advantages": advs})
    return rows


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_page_renders_in_chromium(tmp_path):
    rows = _rows()
    page = tmp_path / "page.html"
    page.write_text(render_page(rows, title="creditlab inspect: test", meta="estimator tempo"), encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    spans = re.findall(r'<span class="tok"[^>]*data-adv', dom.stdout)
    assert len(spans) == sum(len(r["tokens"]) for r in rows)
    assert "&lt;b&gt;answer&lt;/b&gt;" in dom.stdout and "↵" in dom.stdout

    png = tmp_path / "page.png"
    shot = _chromium(tmp_path, f"--screenshot={png}", page.as_uri())
    assert png.is_file(), shot.stderr[-2000:]
    assert png.stat().st_size > 10_000
    image = pytest.importorskip("matplotlib.image").imread(str(png))  # [H, W, C] floats in 0..1
    assert image.shape[0] > 100 and image.shape[1] > 100
    pixels = image[..., :3].reshape(-1, 3)
    assert len({tuple(p) for p in pixels[:: max(1, len(pixels) // 20000)].round(2).tolist()}) > 10  # not one colour
    red = (pixels[:, 0] > pixels[:, 2] + 0.2).mean()
    blue = (pixels[:, 2] > pixels[:, 0] + 0.2).mean()
    assert red > 0.001 and blue > 0.001  # both sides of the scale are drawn
    if os.environ.get("CREDITLAB_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(png, os.environ["CREDITLAB_SCREENSHOT"])
