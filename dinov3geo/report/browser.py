"""Open a report in headless Chromium: check that every image loads, or take a screenshot.

Uses Debian's ``chromium`` (or ``chromium-browser``, ``google-chrome``; ``DINOV3GEO_CHROMIUM`` names another
binary). The image check renders a copy of the report with a small script appended that, on ``load``,
writes ``img.complete && img.naturalWidth > 0`` of every ``<img>`` into the DOM, which ``--dump-dom`` returns.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_CHECK_ID = "dinov3geo-image-check"
_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = document.images, failed = [];
  for (var i = 0; i < imgs.length; i++) {
    var im = imgs[i];
    if (!(im.complete && im.naturalWidth > 0)) failed.push(im.alt || ("image " + i));
  }
  var pre = document.createElement("pre");
  pre.id = "__ID__";
  pre.textContent = JSON.stringify({total: imgs.length, failed: failed,
    widths: Array.prototype.map.call(imgs, function (im) { return im.naturalWidth; })});
  document.body.appendChild(pre);
});
</script>""".replace("__ID__", _CHECK_ID)


class BrowserError(RuntimeError):
    """Chromium is missing, crashed, or returned no result."""


@dataclass
class ImageCheck:
    """Result of :func:`check_images`."""

    total: int
    failed: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)  #: natural width of each image (0 = not loaded)

    @property
    def ok(self) -> bool:
        return not self.failed


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    env = os.environ.get("DINOV3GEO_CHROMIUM")
    if env:
        return env if Path(env).exists() or shutil.which(env) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    exe = find_chromium()
    if exe is None:
        raise BrowserError("no Chromium found: install it (Debian: apt-get install chromium) or set "
                           "DINOV3GEO_CHROMIUM to the binary")
    with tempfile.TemporaryDirectory(prefix="dinov3geo-chromium-") as profile:
        cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise BrowserError(f"chromium did not finish within {timeout:g} s") from e


def check_images(report: str | os.PathLike[str], timeout: float = 120.0) -> ImageCheck:
    """Render ``report`` headless and report which ``<img>`` failed to load.

    Raises:
        BrowserError: no Chromium, or it gave no result.
    """
    src = Path(report).absolute()
    text = src.read_text(encoding="utf-8")
    probe = src.with_name(f".{src.stem}.imgcheck-{os.getpid()}.html")  # same folder: relative links still work
    body_end = text.rfind("</body>")
    probe.write_text(text[:body_end] + _SCRIPT + text[body_end:] if body_end >= 0 else text + _SCRIPT,
                     encoding="utf-8")
    try:
        res = _run(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], timeout)
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(rf'<pre id="{_CHECK_ID}">(.*?)</pre>', res.stdout, re.S)
    if not m:
        raise BrowserError(f"chromium returned no image check (exit {res.returncode}): {res.stderr[-800:]}")
    data = json.loads(html.unescape(m.group(1)))
    return ImageCheck(int(data["total"]), list(data["failed"]), [int(w) for w in data.get("widths", [])])


def screenshot(report: str | os.PathLike[str], png: str | os.PathLike[str], width: int = 1200,
               height: int = 1800, timeout: float = 120.0) -> Path:
    """A PNG screenshot of the top ``width x height`` pixels of ``report`` (e.g. for a README picture)."""
    out = Path(png).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    res = _run(["--hide-scrollbars", "--virtual-time-budget=10000", f"--window-size={width},{height}",
                f"--screenshot={out}", Path(report).absolute().as_uri()], timeout)
    if not out.exists():
        raise BrowserError(f"chromium wrote no screenshot (exit {res.returncode}): {res.stderr[-800:]}")
    return out
