"""A real headless browser for the tests (Debian's chromium), and decoding what it renders."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

_install_tried: list[bool] = []


def chromium() -> str:
    """The chromium binary. Installed here if missing and possible (scripts/setup.sh does it);
    skipped only where it cannot be installed, never on CI."""
    found = shutil.which("chromium")
    if found is None and not _install_tried and os.geteuid() == 0 and shutil.which("apt-get"):
        _install_tried.append(True)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, check=False)
        found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/setup.sh installs it)")
        pytest.skip("chromium is not installed and could not be installed")
    return found


def run_chromium(url: str, workdir: Path, *, screenshot: Path | None = None, size: tuple[int, int] = (1280, 900),
                 budget_ms: int = 4000, timeout: float = 120.0) -> str:
    """Load ``url`` in headless chromium for ``budget_ms`` of (virtual) time; returns the DOM
    after the page's scripts ran (``--dump-dom``) and, if asked, takes a screenshot then too."""
    profile = workdir / f"chromium-profile-{os.getpid()}"
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={budget_ms}"]
    args += ["--dump-dom"] + ([f"--screenshot={screenshot}"] if screenshot is not None else [])
    done = subprocess.run([*args, url], capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"chromium exited {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}")
    if screenshot is not None and not screenshot.exists():
        raise AssertionError(f"chromium wrote no screenshot of {url}: {done.stderr.decode(errors='replace')[-2000:]}")
    return done.stdout.decode()


def load_png(path: Path) -> np.ndarray:
    """RGB pixels of a PNG, as an (height, width, 3) uint8 array."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def assert_not_blank(pixels: np.ndarray, *, min_colors: int = 20) -> None:
    """Something was drawn: more than a few colours, and no single colour covers almost everything."""
    flat = pixels.reshape(-1, pixels.shape[-1])
    colors, counts = np.unique(flat, axis=0, return_counts=True)
    assert len(colors) >= min_colors, f"only {len(colors)} colours: blank image?"
    assert counts.max() / len(flat) < 0.97, "one colour covers more than 97% of the image"
    assert float(flat.std()) > 5.0


def count_color(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    """Pixels within ``tolerance`` of ``rgb`` in every channel."""
    diff = np.abs(pixels.astype(np.int16) - np.array(rgb, dtype=np.int16))
    return int((diff.max(axis=-1) <= tolerance).sum())
