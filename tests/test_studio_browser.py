"""`fvg studio` in a real browser: headless Chromium (Debian's package) driven by Playwright.

Needs `apt-get install -y chromium` and `pip install playwright` (never `playwright install`).
Set FVG_STUDIO_SCREENSHOT=docs/studio.png to refresh the screenshot in the docs.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from fvg.studio.session import StudioSession

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update"]

if not Path(CHROMIUM).is_file():
    pytest.skip(f"no browser at {CHROMIUM}: apt-get install -y chromium", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
pytest.importorskip("gradio", reason="gradio is not installed: pip install 'fvg[studio]'")
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # Gradio vs pandas 3, not ours


@pytest.fixture(scope="module")
def server(tmp_path_factory, free_port):
    from fvg.studio.app import serve

    studio = StudioSession(tmp_path_factory.mktemp("browser"), preset="tiny")
    port = free_port()
    demo = serve(studio, "127.0.0.1", port)
    yield f"http://127.0.0.1:{port}/", studio
    demo.close()


@pytest.fixture()
def page():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser.new_page(viewport={"width": 1280, "height": 1000})
        browser.close()


def test_plan_edit_pick_animate_and_play(server, page, tmp_path):
    expect = playwright.expect
    url, studio = server
    page.goto(url)
    page.locator("#prompt textarea").fill("a red circle moves right")
    page.locator("#plan-btn").click()
    caption = page.locator("#caption textarea")
    expect(caption).not_to_have_value("", timeout=30_000)
    edited = caption.input_value() + ", on a white table"
    caption.fill(edited)
    page.locator("#steps input").fill("2")
    page.locator("#compare input[type=checkbox]").check()

    page.locator("#gen-btn").click()
    thumbs = page.locator("#gallery .thumbnail-item")
    expect(thumbs).to_have_count(4, timeout=60_000)
    thumbs.nth(2).click()
    expect(page.locator("#selected input")).to_have_value("2")

    page.locator("#animate-btn").click()
    expect(page.locator("#status")).to_contain_text("Saved factorized run", timeout=120_000)
    for video_id in ("#video", "#compare-video"):
        video = page.locator(f"{video_id} video")
        expect(video).to_have_count(1)
        state = video.evaluate("""async v => {
            v.muted = true;
            if (v.readyState < 2) await new Promise(r => v.addEventListener('loadeddata', r, {once: true}));
            await v.play();
            await new Promise(r => setTimeout(r, 300));
            return {playing: !v.paused || v.currentTime > 0, readyState: v.readyState, width: v.videoWidth};
        }""")
        assert state["playing"] and state["readyState"] >= 2 and state["width"] == 32, (video_id, state)
    for name in ("video.mp4", "anchor.png", "plan.json", "run.json"):
        expect(page.locator(f'#downloads a[href$="/{name}"]')).to_have_count(1)
    expect(page.locator("#history")).to_contain_text("factorized + t2v")

    shot = tmp_path / "studio.png"
    page.screenshot(path=shot, full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("FVG_STUDIO_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["FVG_STUDIO_SCREENSHOT"])

    record = json.loads((studio.history[-1].out_dir / "run.json").read_text())
    assert record["anchor"]["selected"] == 2 and record["anchor"]["caption"] == edited and record["steps"] == 2


def test_bad_upload_shows_the_reason(server, page, tmp_path):
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"this is not a picture")
    page.goto(server[0])
    page.locator('input[data-testid="Upload my own image-upload-button"]').set_input_files(bad)
    toast = page.locator(".toast-body")
    playwright.expect(toast).to_contain_text("cannot read image holiday.png", timeout=30_000)
    assert "Traceback" not in toast.inner_text()
