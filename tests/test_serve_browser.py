"""The page of `geoswc serve` in a real browser: headless Chromium (Debian's package, driven by Playwright) on
a real server, with every request off 127.0.0.1 blocked, as on a machine with no network.

Skipped when /usr/bin/chromium is absent, unless GEOSWC_REQUIRE_BROWSER=1 (CI sets it), which makes a missing
browser a failure. Screenshots are kept in tests/artifacts/ (git-ignored) and in the test's tmp folder.
"""

import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


def _need_browser():
    required = os.environ.get("GEOSWC_REQUIRE_BROWSER") == "1"
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        missing.append(f"{err.name} (pip install -e '.[test]')")
    if missing:
        message = "the browser tests need " + ", ".join(missing)
        if required:
            pytest.fail(message + " (GEOSWC_REQUIRE_BROWSER=1)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    _need_browser()
    import uvicorn

    from geoswc.geolocator import Geolocator
    from geoswc.serve import ServeSettings, create_app

    model = Geolocator.from_pretrained(tiny_model_dir, device="cpu")
    images = tmp_path_factory.mktemp("background")
    for i, bg_id in enumerate(model.index.ids):
        Image.new("RGB", (96, 72), (40 * i % 255, 120, 200)).save(images / str(bg_id), "JPEG")
    app = create_app(model, ServeSettings(images=str(images), tile_url=None))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start within 60 s"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        blocked = []

        def offline(route):
            if route.request.url.startswith(server):
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort()

        context.route("**/*", offline)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(server + "/")
        yield page
        assert errors == [], errors
        browser.close()


def _screenshot(page, tmp_path, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))
    page.screenshot(path=str(tmp_path / name))
    assert (tmp_path / name).stat().st_size > 10_000


def _photo(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")
    return path


def _drag_box(page, south_west, north_east):
    """Drag a rectangle on the map between two (lat, lon) corners, as a user does with 'Draw area'."""
    page.evaluate("() => { window.geoswcMap.setView([49, 2.5], 6, {animate: false}); }")
    box = page.locator("#map").bounding_box()
    points = page.evaluate(
        "([a, b]) => [a, b].map((p) => window.geoswcMap.latLngToContainerPoint(p))", [south_west, north_east]
    )
    (x0, y0), (x1, y1) = [(box["x"] + p["x"], box["y"] + p["y"]) for p in points]
    page.click("#draw-area")
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2)
    page.mouse.move(x1, y1)
    page.mouse.up()


def test_upload_shows_prediction_cells_neighbours_offline(page, server, tmp_path):
    import httpx

    page.wait_for_selector("#map[data-basemap=ready]", timeout=30_000)
    # The offline basemap is on the map: land filled in the basemap colour.
    assert page.locator(".leaflet-overlay-pane path[fill='#e8e4d8']").count() >= 1
    photo = _photo(tmp_path / "street.jpg", 1)
    page.set_input_files("#file-input", str(photo))
    page.wait_for_selector(".pred-marker", timeout=60_000)
    page.wait_for_selector("path.cell-polygon", state="attached", timeout=10_000)
    assert page.locator("path.cell-polygon").count() == 5
    assert page.locator("#top-cells tr").count() == 1 + 5  # a header and the five cells
    assert page.locator("#head").is_visible() and page.locator("#top-k").is_visible()

    # The marker is where the API places the same photo.
    expected = httpx.post(server + "/v1/locate", files={"file": ("street.jpg", photo.read_bytes())}).json()
    row = expected["results"][0]
    title = page.locator(".pred-marker").get_attribute("title")
    assert title == f"street.jpg: {row['lat']:.4f}, {row['lon']:.4f}"
    assert page.locator(".method").inner_text() == row["method"]

    # Restrict to Paris, where the background photos are: Search within Cell finds neighbours there.
    _drag_box(page, [48.0, 1.0], [50.0, 4.0])
    page.wait_for_selector("#neighbours li.in-cluster", timeout=60_000)
    assert page.locator(".area-box").count() == 1
    assert re.fullmatch(
        r"S 4[78]\.\d\d W [01]\.\d\d N (49|50)\.\d\d E [34]\.\d\d", page.inner_text("#area-text")
    )
    confidence = page.locator(".confidence").inner_text()
    assert re.fullmatch(r"(high|medium|low) \(\d\.\d\d\)", confidence)
    assert page.locator(".method").inner_text() == "swc"
    n_items = page.locator("#neighbours li").count()
    assert n_items >= 2
    assert page.locator("path.neighbour-marker").count() == n_items
    assert (
        page.locator("path.neighbour-marker.in-cluster").count()
        == page.locator("#neighbours li.in-cluster").count()
    )
    # Thumbnails of the neighbours load from --images.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#neighbours img')].every((img) => img.complete && img.naturalWidth > 0)"
    )
    _screenshot(page, tmp_path, "serve_locate.png")


def test_switching_head_and_mode_relocates(page, tmp_path):
    page.wait_for_selector("#map[data-basemap=ready]", timeout=30_000)
    page.set_input_files("#file-input", [str(_photo(tmp_path / f"p{i}.jpg", 10 + i)) for i in range(3)])
    page.wait_for_selector(".pred-marker", timeout=60_000)
    assert page.locator("#results li").count() == 3
    page.select_option("#mode", "cell")
    page.wait_for_function(
        "() => document.querySelector('.method') && document.querySelector('.method').textContent === 'cell'"
    )
    page.select_option("#head", "hc")
    page.wait_for_function("() => document.querySelector('#detail').textContent.includes('head hc')")
    page.locator("#results li").nth(2).click()
    assert page.locator("#detail h3").inner_text() == "p2.jpg"


def test_abstention_and_exif_gps_are_shown(page, server, tmp_path):
    import httpx

    from geoswc.tagging.exif_copies import write_gps_exif

    page.wait_for_selector("#map[data-basemap=ready]", timeout=30_000)
    photo = tmp_path / "eiffel.jpg"
    write_gps_exif(str(_photo(tmp_path / "plain.jpg", 3)), str(photo), 48.8584, 2.2945)
    page.fill("#min-confidence", "1")
    page.set_input_files("#file-input", str(photo))
    page.wait_for_selector(".pred-marker.abstain", timeout=60_000)
    row = httpx.post(
        server + "/v1/locate",
        files={"file": ("eiffel.jpg", photo.read_bytes())},
        data={"min_confidence": "1"},
    ).json()["results"][0]
    assert row["status"] == "abstain"
    title = page.locator(".pred-marker").get_attribute("title")
    assert title == f"eiffel.jpg: guess {row['guess_lat']:.4f}, {row['guess_lon']:.4f}"
    assert "Abstained" in page.inner_text("#detail")
    assert page.locator("#results li.abstain").count() == 1
    assert page.locator(".exif-marker").get_attribute("title") == "eiffel.jpg: EXIF GPS 48.8584, 2.2945"
    exif = page.inner_text("#detail .exif")
    assert "48.85840, 2.29450" in exif and f"{row['exif_distance_km']:.1f} km from the guess" in exif
    _screenshot(page, tmp_path, "serve_abstain.png")
    # Without the threshold the same photo is placed.
    page.fill("#min-confidence", "")
    page.dispatch_event("#min-confidence", "change")
    page.wait_for_selector(".pred-marker:not(.abstain)", timeout=60_000)
    assert "Abstained" not in page.inner_text("#detail")


def test_tag_run_view_clusters_and_reviews(page, tmp_path):
    lines = ["path,status,error,lat,lon,method,cell_token,cell_probability,confidence"]
    rng = np.random.default_rng(0)
    for i in range(30):
        lat, lon = 48.85 + rng.normal(scale=0.05), 2.35 + rng.normal(scale=0.05)
        lines.append(f"photos/img_{i:02d}.jpg,ok,,{lat:.5f},{lon:.5f},swc,47e6,0.5,0.4")
    lines.append('photos/broken.jpg,error,"JPEG: truncated, 12 bytes",,,,,,')
    tags = tmp_path / "tags.csv"
    tags.write_text("\n".join(lines) + "\n")
    page.click("#tab-tags")
    page.set_input_files("#tags-input", str(tags))
    page.wait_for_selector(".marker-cluster", timeout=30_000)
    assert page.locator("#tags-list li").count() == 31
    assert "31 photos, 30 on the map" in page.inner_text("#tags-summary")
    assert page.inner_text("#tags-pos") == "1 / 31"
    page.click("#tags-prev")
    assert page.inner_text("#tags-pos") == "31 / 31"
    assert "JPEG: truncated, 12 bytes" in page.inner_text("#tags-detail")
    page.click("#tags-next")
    page.click("#tags-next")
    assert "photos/img_01.jpg" in page.inner_text("#tags-detail")
    _screenshot(page, tmp_path, "serve_tags.png")
