"""The page of `geoswc serve` against hostile strings and for what it requests, in headless Chromium on a real
server, every request off the server blocked and recorded (as tests/test_serve_browser.py does).

Every string from a file name, a tag run, a model folder or an upload reaches the page as text: a photo named
``<img src=x onerror=alert(1)>.jpg`` shows its name and runs nothing. The page and ``/docs`` request nothing
from another host, and the answers carry a Content-Security-Policy that forbids inline script.
"""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from test_serve_browser import CHROMIUM, LAUNCH_ARGS, _drag_box, _need_browser

pytestmark = pytest.mark.slow

MARKUP = "<img src=x onerror=alert(1)>"


class _Server:
    def __init__(self, app):
        import uvicorn

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start within 60 s"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def serve():
    _need_browser()
    servers = []

    def start(model_dir, **settings):
        from geoswc.geolocator import Geolocator
        from geoswc.serve import ServeSettings, create_app

        model = Geolocator.from_pretrained(model_dir, device="cpu")
        servers.append(_Server(create_app(model, ServeSettings(**settings))))
        return servers[-1].url

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


def _open(browser, url, path="/"):
    """A page at ``url + path``; returns it with the lists of blocked requests, dialogs and script errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    seen = {"blocked": [], "dialogs": [], "errors": []}

    def offline(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            seen["blocked"].append(route.request.url)
            route.abort()

    context.route("**/*", offline)
    page = context.new_page()
    page.on("dialog", lambda dialog: (seen["dialogs"].append(dialog.message), dialog.dismiss()))
    page.on("pageerror", lambda err: seen["errors"].append(str(err)))
    page.goto(url + path)
    return page, seen


def _photo(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")
    return path


def _assert_nothing_ran(page, seen):
    page.wait_for_timeout(500)  # an image error handler would have fired by now
    assert seen["dialogs"] == [], seen["dialogs"]
    assert seen["blocked"] == [], seen["blocked"]
    assert seen["errors"] == [], seen["errors"]
    assert page.locator("img[src='x']").count() == 0


def test_a_tagged_photos_markup_name_is_text_in_the_tag_run_view(serve, browser, tiny_model_dir, tmp_path):
    from geoswc.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / f"{MARKUP}.jpg", 1)
    tags = tmp_path / "tags.csv"
    assert main(["tag", str(photos), "--model", str(tiny_model_dir), "-o", str(tags)]) == 0
    url = serve(tiny_model_dir, tags=str(tags))
    page, seen = _open(browser, url)
    page.wait_for_selector("#map[data-basemap=ready]", timeout=30_000)
    page.click("#tab-tags")
    page.wait_for_selector(".leaflet-marker-icon", timeout=30_000)
    page.locator(".leaflet-marker-icon").first.click()
    popup = page.wait_for_selector(".leaflet-popup-content", timeout=10_000)
    assert popup.inner_text().endswith(f"{MARKUP}.jpg")
    # Drawn at full opacity at once (Leaflet's fade-in left it faint in the view and its screenshot).
    style = page.evaluate(
        "() => [...document.querySelectorAll('.leaflet-popup')].map((p) => {"
        " const s = getComputedStyle(p); return [s.opacity, s.transitionDuration]; })"
    )
    assert style == [["1", "0s"]]
    assert MARKUP in page.inner_text("#tags-detail")
    _assert_nothing_ran(page, seen)


def test_a_geojson_opened_from_disk_shows_its_strings_as_text(serve, browser, tiny_model_dir, tmp_path):
    run = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [2.35, 48.85]},
                "properties": {"path": f"{MARKUP}.jpg", "status": "ok", "method": MARKUP, "place": MARKUP},
            }
        ],
    }
    geojson = tmp_path / "run.geojson"
    geojson.write_text(json.dumps(run))
    page, seen = _open(browser, serve(tiny_model_dir))
    page.click("#tab-tags")
    page.set_input_files("#tags-input", str(geojson))
    popup = page.wait_for_selector(".leaflet-popup-content", timeout=30_000)
    assert popup.inner_text() == f"{MARKUP}.jpg"
    assert page.inner_text("#tags-list li") == f"{MARKUP}.jpg · ok"
    _assert_nothing_ran(page, seen)


def test_background_ids_with_markup_are_text_in_the_neighbour_tooltips(
    serve, browser, tiny_model_dir, tmp_path
):
    from geoswc.geolocator import Geolocator

    # A model folder whose background ids are markup, saved as geoswc saves any model.
    model = Geolocator.from_pretrained(tiny_model_dir, device="cpu")
    model.index.ids = [f"{MARKUP}{i}" for i in model.index.ids]
    model_dir = model.save_pretrained(tmp_path / "model")
    page, seen = _open(browser, serve(model_dir))
    page.wait_for_selector("#map[data-basemap=ready]", timeout=30_000)
    page.set_input_files("#file-input", str(_photo(tmp_path / "street.jpg", 1)))
    page.wait_for_selector(".pred-marker", timeout=60_000)
    # Restrict to Paris, where the background photos are: neighbours are found and listed.
    _drag_box(page, [48.0, 1.0], [50.0, 4.0])
    page.wait_for_selector("#neighbours li.in-cluster", timeout=60_000)
    tooltips = page.evaluate(
        """() => { const out = [];
          window.geoswcMap.eachLayer((layer) => {
            if (layer.getTooltip && layer.getTooltip()) { layer.openTooltip(); out.push(layer.getTooltip().getElement().innerText); }
          });
          return out; }"""
    )
    neighbour_tips = [t for t in tooltips if "similarity" in t]
    assert neighbour_tips and all(t.startswith(MARKUP) for t in neighbour_tips)
    assert all(MARKUP in li for li in page.locator("#neighbours li").all_inner_texts())
    assert page.locator(".leaflet-tooltip img").count() == 0
    _assert_nothing_ran(page, seen)


def test_the_default_page_and_docs_request_nothing_elsewhere(serve, browser, tiny_model_dir, tmp_path):
    url = serve(tiny_model_dir)  # default settings: no --tiles
    page, seen = _open(browser, url)
    page.wait_for_selector("#map[data-basemap=ready]", timeout=30_000)
    page.set_input_files("#file-input", str(_photo(tmp_path / "plain.jpg", 2)))
    page.wait_for_selector(".pred-marker", timeout=60_000)
    # A photo without EXIF: the panel shows no bare "null" for what is absent.
    assert "null" not in page.inner_text("#detail")
    page.wait_for_timeout(1500)
    assert seen["blocked"] == [] and seen["errors"] == []

    docs, seen = _open(browser, url, "/docs")
    docs.wait_for_selector("main[aria-busy=false]", timeout=30_000)
    assert docs.locator("section.endpoint").count() >= 5
    assert "/v1/locate" in docs.inner_text("#docs") and "min_confidence" in docs.inner_text("#docs")
    assert seen["blocked"] == [] and seen["errors"] == [] and seen["dialogs"] == []


def test_csp_blocks_inline_script_in_the_page(serve, browser, tiny_model_dir):
    page, seen = _open(browser, serve(tiny_model_dir))
    page.wait_for_selector("#map[data-basemap=ready]", timeout=30_000)
    # Markup inserted as HTML despite everything above would still not run: the policy forbids inline
    # handlers, and the page itself has none.
    page.evaluate("() => { document.body.insertAdjacentHTML('beforeend', '<img src=x onerror=alert(1)>'); }")
    page.wait_for_timeout(500)
    assert seen["dialogs"] == []
