"""The report in a real browser: headless Chromium loads it without errors and shows the targets table.

CI installs the browser with: apt-get install -y --no-install-recommends chromium
"""
import re
import shutil
import subprocess

import pytest
from PIL import Image

import reports
from report_runs import write_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                "(apt-get install -y --no-install-recommends chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]

# Added to a copy of the page only (the report itself has no scripts): after load, record how many images
# the browser decoded, and any script error, on <body> where --dump-dom shows them.
PROBE = """<script>
window.addEventListener('error', function (e) { document.body.setAttribute('data-error', String(e.message)); });
window.addEventListener('load', function () {
  var bad = Array.from(document.images).filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute('data-probe', 'images=' + document.images.length + ' broken=' + bad.length);
});
</script>"""


def chromium(tmp_path, *args):
    profile = tmp_path / "profile"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def page_errors(stderr: str) -> list[str]:
    """Console errors and failed loads the page itself caused (browser start-up noise such as D-Bus is not)."""
    markers = ("Failed to load resource", "Uncaught", "net::ERR_", "Not allowed to load local resource")
    return [line for line in stderr.splitlines() if any(m in line for m in markers)]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = write_run(tmp_path_factory.mktemp("browser"), "browser-run")
    return reports.render([folder])


def test_page_loads_without_errors_and_shows_targets(report, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    done = chromium(tmp_path, "--dump-dom", probed.as_uri())
    assert page_errors(done.stderr) == []
    dom = done.stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-probe="images=3 broken=0"' in body and "data-error" not in body
    assert '<table class="targets">' in dom
    assert "Time to first token" in dom and "3 of 4 targets pass, 1 fail." in dom


def test_probe_notices_a_broken_image(tmp_path):
    """The check above would catch a figure the browser cannot show."""
    page = tmp_path / "broken.html"
    page.write_text('<html><body><img src="data:image/png;base64,AAAA">' + PROBE + "</body></html>")
    assert 'data-probe="images=1 broken=1"' in chromium(tmp_path, "--dump-dom", page.as_uri()).stdout


def test_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "page.png"
    chromium(tmp_path, "--window-size=1280,1600", f"--screenshot={shot}", report.as_uri())
    image = Image.open(shot).convert("L")
    lo, hi = image.getextrema()
    assert image.size == (1280, 1600) and hi - lo > 100     # text and figures drawn, not an empty page
