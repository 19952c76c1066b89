"""End to end: `python -m miniclip.apps.demo` in a subprocess on a free loopback port, with a tiny checkpoint and coloured
images made here, driven in headless Chromium through Playwright (Debian's `chromium`, not Playwright's download).
Skips, saying what to install, only when gradio, playwright or the browser is missing."""
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="gradio not installed: pip install -e '.[demo]'")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install playwright")

from miniclip.checkpoints import save_pretrained  # noqa: E402
from miniclip.tokenizer import get_tokenizer  # noqa: E402
from tests.test_demo import COLOURS, make_image_set, tiny_model  # noqa: E402
from processes import free_port, stop

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("MINICLIP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Headless and quiet: no GPU, no QUIC, no update / sync / background requests (the test machine may be offline).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOP_K = 4


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"demo exited with code {process.returncode} before serving:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"demo did not answer on {url} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    captions = make_image_set(root / "data")
    model = tiny_model()
    checkpoint = save_pretrained(model, root / "checkpoint", tokenizer=get_tokenizer(model.config))
    port, log = free_port(), root / "demo.log"
    command = [sys.executable, "-m", "miniclip.apps.demo", "--checkpoint", str(checkpoint), "--data", str(captions),
               "--port", str(port), "--top_k", str(TOP_K), "--cache_dir", str(root / "cache")]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log)
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium` "
                    "(or set MINICLIP_CHROMIUM to a Chromium binary)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, demo_url):
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(demo_url, wait_until="networkidle")
    yield page
    page.close()


def results(page):
    return page.locator("#results img")


def search_text(page, query: str) -> None:
    page.locator("#query textarea").fill(query)
    page.locator("#query textarea").press("Enter")


def test_text_query_fills_the_gallery(page, tmp_path):
    expect = playwright_api.expect
    expect(page.locator("body")).to_contain_text(f"{len(COLOURS)} images indexed")
    search_text(page, "a red square")
    expect(page.locator("#status")).to_contain_text(f"Top {TOP_K} of {len(COLOURS)} images", timeout=60_000)
    expect(results(page)).to_have_count(TOP_K)
    captions = page.locator("#results").inner_text()
    assert captions.count(" · ") == TOP_K and "square" in captions  # "0.123 · a red square" under each image
    page.screenshot(path=str(tmp_path / "demo_text_search.png"), full_page=True)
    assert (tmp_path / "demo_text_search.png").stat().st_size > 10_000


def test_k_slider_changes_the_number_of_results(page):
    expect = playwright_api.expect
    k_box = page.locator("#k input[type=number]")
    k_box.fill("2")
    k_box.press("Enter")
    search_text(page, "something blue")
    expect(page.locator("#status")).to_contain_text(f"Top 2 of {len(COLOURS)} images", timeout=60_000)
    expect(results(page)).to_have_count(2)


def test_image_upload_finds_the_same_image_first(page, demo_url, tmp_path_factory):
    expect = playwright_api.expect
    image = next(tmp_path_factory.getbasetemp().glob("demo*/data/images/blue.png"))
    page.locator("#upload input[type=file]").set_input_files(str(image))
    expect(page.locator("#status")).to_contain_text(f"Top {TOP_K} of", timeout=60_000)
    expect(results(page)).to_have_count(TOP_K)
    expect(page.locator("#results")).to_contain_text("1.000 · a blue square")


def test_bad_input_gives_messages_in_the_page(page, tmp_path):
    expect = playwright_api.expect
    search_text(page, "dog " * 200)
    expect(page.locator("#status")).to_contain_text("truncated", timeout=60_000)
    expect(results(page)).to_have_count(TOP_K)
    page.locator("#query textarea").fill("   ")
    page.locator("#search").click()  # empty query: a message, and the previous results cleared
    expect(page.locator("#status")).to_contain_text("Type a description", timeout=60_000)
    expect(results(page)).to_have_count(0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    page.locator("#upload input[type=file]").set_input_files(str(broken))
    expect(page.locator("#status")).to_contain_text("Could not read broken.jpg as an image", timeout=60_000)
    page.screenshot(path=str(tmp_path / "demo_bad_upload.png"), full_page=True)
    assert "Traceback" not in page.content()
