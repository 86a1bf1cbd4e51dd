"""Screenshot an HTML page (a ``gradscope report`` page) in headless Chromium, to check how it reads in a browser.

    python scripts/screenshot_report.py REPORT.html OUT.png [--width 1280] [--height 2400] [--offset 0]

Chromium draws the page at a ``--width`` x ``--height`` window and saves what it shows. ``--offset Y`` shows the page
from Y pixels down instead of from the top (the window is made Y pixels taller and the top cut off; needs Pillow,
which matplotlib already brings). Needs Chromium: ``apt-get install chromium`` (Debian/Ubuntu), or any
``chromium`` / ``chromium-browser`` / ``google-chrome`` on the PATH, or its path in ``$CHROMIUM``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = "install it with `apt-get install chromium` (Debian/Ubuntu), or set $CHROMIUM to its path"


def find_chromium() -> str:
    """The Chromium binary: ``$CHROMIUM``, else the first of :data:`NAMES` on the PATH; a FileNotFoundError that says
    how to install it when there is none."""
    given = os.environ.get("CHROMIUM")
    if given:
        found = shutil.which(given)
        if found is None:
            raise FileNotFoundError(f"$CHROMIUM={given} is not an executable; {INSTALL}")
        return found
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(f"no Chromium found (looked for {', '.join(NAMES)} on the PATH); {INSTALL}")


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2400, offset: int = 0,
               timeout: float = 120.0) -> Path:
    """Save a ``width`` x ``height`` screenshot of ``page`` (from ``offset`` pixels down) to ``out``; return ``out``."""
    page, out = Path(page).resolve(), Path(out).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"{page}: no such file")
    if width < 1 or height < 1 or offset < 0:
        raise ValueError(f"width and height must be >= 1 and offset >= 0, got {width}, {height}, {offset}")
    binary = find_chromium()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="screenshot-") as tmp:
        shot = Path(tmp) / "shot.png" if offset else out
        cmd = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
               "--disable-dev-shm-usage", "--run-all-compositor-stages-before-draw",
               "--virtual-time-budget=10000", f"--user-data-dir={Path(tmp) / 'profile'}", f"--screenshot={shot}",
               f"--window-size={width},{height + offset}", page.as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not shot.is_file():
            raise RuntimeError(f"{binary} exited with {done.returncode} and wrote no screenshot:\n"
                               f"{(done.stderr or done.stdout)[-2000:]}")
        if offset:
            from PIL import Image

            with Image.open(shot) as image:
                image.crop((0, offset, image.width, min(image.height, offset + height))).save(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page", type=Path, help="the HTML file (e.g. report.html)")
    ap.add_argument("out", type=Path, help="the PNG to write")
    ap.add_argument("--width", type=int, default=1280, help="window width in pixels (default 1280)")
    ap.add_argument("--height", type=int, default=2400, help="window height in pixels (default 2400)")
    ap.add_argument("--offset", type=int, default=0, help="pixels from the top of the page to start at (default 0)")
    args = ap.parse_args(argv)
    try:
        path = screenshot(args.page, args.out, args.width, args.height, args.offset)
    except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"screenshot_report: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
