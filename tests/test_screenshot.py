"""scripts/screenshot_report.py: a report page drawn by headless Chromium (skipped where there is no Chromium)."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from gradscope import report

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "screenshot_report.py"


def load_script():
    spec = importlib.util.spec_from_file_location("screenshot_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_chromium_the_error_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    shot = load_script()
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    page = tmp_path / "page.html"
    page.write_text("<p>hello</p>")
    assert shot.main([str(page), str(tmp_path / "out.png")]) == 1
    err = capsys.readouterr().err
    assert "apt-get install chromium" in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.slow  # starts a headless Chromium (where one is installed): a few seconds
def test_a_report_screenshot(run_file, tmp_path):
    shot = load_script()
    if not any(shutil.which(name) for name in shot.NAMES):
        pytest.skip("no Chromium on the PATH (apt-get install chromium)")
    from PIL import Image

    _, log = run_file
    assert report.main([str(log), "--out", str(tmp_path / "rep")]) == 0
    out = tmp_path / "shot.png"
    assert shot.main([str(tmp_path / "rep/report.html"), str(out), "--width", "900", "--height", "700"]) == 0
    with Image.open(out) as image:
        assert image.size == (900, 700)
        colours = image.convert("L").getextrema()
    assert colours[0] < 100 and colours[1] > 200  # text drawn on a light page, not a blank image
    below = tmp_path / "below.png"
    assert shot.main([str(tmp_path / "rep/report.html"), str(below), "--width", "900", "--height", "500",
                      "--offset", "700"]) == 0
    with Image.open(below) as image:
        assert image.size == (900, 500)
