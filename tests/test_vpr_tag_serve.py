"""A model folder written by `geoswc vpr index` through the front door: `Geolocator.from_pretrained`, `geoswc
tag` and `geoswc serve` place street photos at their database matches, the answers of `geoswc vpr locate`."""

from __future__ import annotations

import csv
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from vpr_fixtures import make_tiny_world

from geoswc.cli import main
from geoswc.eval.metrics import haversine_km
from geoswc.geolocator import Geolocator
from geoswc.street.predictor import StreetGeolocator
from geoswc.vpr.locate import PlaceLocator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    base = tmp_path_factory.mktemp("vpr_front")
    world = make_tiny_world(base / "w")
    model = base / "model"
    assert (
        main(["vpr", "index", str(world), "--preset", "tiny", "--pool", "gem", "-o", str(model), "--quiet"])
        == 0
    )
    return world, model


def _truth(path: str):
    """The position a street-world photo's name records (``@east@north@zone@letter@lat@lon@...``)."""
    fields = Path(path).name.split("@")
    return float(fields[5]), float(fields[6])


def test_tag_places_street_photos_as_vpr_locate(indexed, tmp_path):
    world, model = indexed
    queries = world / "images" / "test" / "queries"
    assert isinstance(Geolocator.from_pretrained(model), StreetGeolocator)
    tagged, located = tmp_path / "tags.csv", tmp_path / "located.csv"
    assert main(["tag", str(queries), "--model", str(model), "-o", str(tagged)]) == 0
    assert main(["vpr", "locate", str(model), str(queries), "-o", str(located)]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(tagged.open())}
    answers = {Path(r["photo"]).name: r for r in csv.DictReader(located.open())}
    assert sorted(rows) == sorted(answers) and len(rows) == 12
    errors_m = []
    for name, row in rows.items():
        assert row["status"] == "ok" and row["method"] == "match"
        assert float(row["lat"]) == pytest.approx(float(answers[name]["lat"]), abs=1e-6)
        assert float(row["lon"]) == pytest.approx(float(answers[name]["lon"]), abs=1e-6)
        errors_m.append(1000 * float(haversine_km(*_truth(name), float(row["lat"]), float(row["lon"]))))
    assert sum(e <= 25.0 for e in errors_m) > len(errors_m) / 2, np.round(errors_m, 1)


def test_python_cluster_mode_is_the_locators(indexed):
    world, model = indexed
    photo = sorted((world / "images" / "test" / "queries").iterdir())[0]
    street = Geolocator.from_pretrained(model)
    got = street.predict(photo, k=5, eps_m=25.0)[0]
    want = PlaceLocator.from_pretrained(model).locate([photo], k=5, eps_m=25.0)[0]
    assert got["method"] == "cluster"
    assert (got["lat"], got["lon"]) == pytest.approx((want["lat"], want["lon"]), abs=1e-9)
    assert [n["id"] for n in got["neighbours"]] == [m["path"] for m in want["matches"]]
    with pytest.raises(ValueError, match="unknown head .ce.; a street-scale model"):
        street.predict(photo, head="ce")


def test_tag_street_k_clusters_as_vpr_locate(indexed, tmp_path, capsys):
    world, model = indexed
    queries = world / "images" / "test" / "queries"
    tagged, located = tmp_path / "tags.csv", tmp_path / "located.csv"
    cluster = ["--street-k", "5", "--street-eps-m", "25"]
    assert main(["tag", str(queries), "--model", str(model), "-o", str(tagged), *cluster]) == 0
    assert (
        main(["vpr", "locate", str(model), str(queries), "-k", "5", "--eps-m", "25", "-o", str(located)]) == 0
    )
    rows = {Path(r["path"]).name: r for r in csv.DictReader(tagged.open())}
    answers = {Path(r["photo"]).name: r for r in csv.DictReader(located.open())}
    first = PlaceLocator.from_pretrained(model).locate(sorted(queries.iterdir()), k=1)
    assert sorted(rows) == sorted(answers) and len(rows) == 12
    moved = 0
    for name, row in rows.items():
        assert row["method"] == "cluster" and answers[name]["method"].startswith("cluster")
        assert float(row["lat"]) == pytest.approx(float(answers[name]["lat"]), abs=1e-6)
        assert float(row["lon"]) == pytest.approx(float(answers[name]["lon"]), abs=1e-6)
    for record in first:
        row = rows[Path(record["photo"]).name]
        moved += abs(float(row["lat"]) - record["lat"]) + abs(float(row["lon"]) - record["lon"]) > 1e-7
    assert moved > 0  # the cluster's centre is not the first match's position for every photo
    capsys.readouterr()
    for bad, needle in (
        (["--street-k", "101"], "k must be an integer from 1 to 100"),
        (
            ["--street-eps-m", "0"],
            "eps_m must be a number of metres over 0",
        ),
    ):
        assert main(["tag", str(queries), "--model", str(model), "-o", str(tmp_path / "x.csv"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


@pytest.fixture(scope="module")
def street_app(indexed):
    pytest.importorskip("fastapi")
    from geoswc.serve import ServeSettings, create_app
    from geoswc.tagging.run import load_predictor

    world, model = indexed
    predictor = load_predictor(str(model), device="cpu")
    return create_app(predictor, ServeSettings(images=str(world / "images" / "test"), tile_url=None))


def test_serve_locate_answers_database_neighbours(indexed, street_app):
    from fastapi.testclient import TestClient

    world, model = indexed
    split = world / "images" / "test"
    photo = sorted((split / "queries").iterdir())[1]
    want = PlaceLocator.from_pretrained(model).locate([photo], matches=5)[0]
    with TestClient(street_app, base_url="http://localhost") as client:
        info = client.get("/v1/model").json()
        assert info["modes"] == ["swc", "rrm"] and info["heads"] == [] and info["background_size"] == 42
        row = client.post("/v1/locate", files={"file": ("q.jpg", photo.read_bytes())}).json()["results"][0]
        assert row["status"] == "ok" and row["method"] == "match"
        assert (row["lat"], row["lon"]) == pytest.approx((want["lat"], want["lon"]), abs=1e-6)
        assert [n["id"] for n in row["neighbours"]] == [m["path"] for m in want["matches"]]
        assert [n["in_cluster"] for n in row["neighbours"]] == [True, False, False, False, False]
        thumb = client.get("/v1/thumbnail", params={"id": row["neighbours"][0]["id"]})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"

        # The area restricts the database: only the first street's photos can match.
        photos = PlaceLocator.from_pretrained(model).photos
        street0 = photos[photos["path"].str.contains("@s0d")]
        box = f"{street0.lat.min()},{street0.lon.min()},{street0.lat.max()},{street0.lon.max()}"
        inside = client.post(
            "/v1/locate", data={"area": box, "top_k": "8"}, files={"file": ("q.jpg", photo.read_bytes())}
        ).json()["results"][0]
        assert len(inside["neighbours"]) == 8 and all("@s0d" in n["id"] for n in inside["neighbours"])

        bad = client.post("/v1/locate", data={"mode": "cell"}, files={"file": ("q.jpg", photo.read_bytes())})
        assert bad.status_code == 422 and "swc, rrm" in bad.json()["detail"]
        far = client.post(
            "/v1/locate", data={"area": "0,0,1,1"}, files={"file": ("q.jpg", photo.read_bytes())}
        )
        assert far.status_code == 422 and "no database photo" in far.json()["detail"]


def test_serve_locate_clusters_the_first_k_matches(indexed, street_app):
    from fastapi.testclient import TestClient

    world, model = indexed
    photos = sorted((world / "images" / "test" / "queries").iterdir())
    locator = PlaceLocator.from_pretrained(model)
    with TestClient(street_app, base_url="http://localhost") as client:
        for photo in photos[:4]:
            want = locator.locate([photo], k=5, eps_m=25.0)[0]
            got = client.post(
                "/v1/locate", data={"k": "5", "eps_m": "25"}, files={"file": ("q.jpg", photo.read_bytes())}
            ).json()["results"][0]
            assert got["method"] == "cluster"
            assert (got["lat"], got["lon"]) == pytest.approx((want["lat"], want["lon"]), abs=1e-6)
            assert [n["id"] for n in got["neighbours"]] == [m["path"] for m in want["matches"]]
            assert [n["in_cluster"] for n in got["neighbours"]] == [m["in_cluster"] for m in want["matches"]]
        for form, needle in (
            ({"k": "101"}, "k must be an integer from 1 to 100"),
            ({"k": "two"}, "k must be an integer"),
            ({"eps_m": "0"}, "eps_m must be a number of metres over 0 and at most 10000"),
            ({"eps_m": "10001"}, "at most 10000"),
        ):
            bad = client.post("/v1/locate", data=form, files={"file": ("q.jpg", photos[0].read_bytes())})
            detail = bad.json()["detail"]
            assert bad.status_code == 422 and needle in detail and "\n" not in detail, detail


def test_serve_page_shows_matched_database_photos(indexed, street_app, tmp_path):
    from test_serve_browser import CHROMIUM, LAUNCH_ARGS, _need_browser

    from conftest import free_port

    _need_browser()
    import uvicorn
    from playwright.sync_api import sync_playwright

    world, model = indexed
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(street_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start within 60 s"
        time.sleep(0.05)
    server = f"http://127.0.0.1:{port}"
    photo = sorted((world / "images" / "test" / "queries").iterdir())[1]
    want = PlaceLocator.from_pretrained(model).locate([photo], matches=5)[0]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            blocked, errors = [], []

            def offline(route):
                if route.request.url.startswith(server):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            context.route("**/*", offline)
            page = context.new_page()
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(server + "/")
            page.wait_for_selector("#map[data-basemap=ready]", timeout=30_000)
            page.set_input_files("#file-input", str(photo))
            page.wait_for_selector(".pred-marker", timeout=60_000)
            title = page.locator(".pred-marker").get_attribute("title")
            assert title == f"{photo.name}: {want['lat']:.4f}, {want['lon']:.4f}"
            assert page.locator(".method").inner_text() == "match"
            # No head, cells or cell confidence in a street model: their controls and rows are not shown.
            assert page.locator("#head").is_hidden() and page.locator("#top-k").is_hidden()
            assert page.locator("#mode").is_visible()
            assert page.locator(".confidence").count() == 0 and page.locator("#top-cells").count() == 0
            # The matched database photos: one marker and one list item each, the first in the cluster.
            page.wait_for_selector("path.neighbour-marker", state="attached", timeout=10_000)
            assert page.locator("path.neighbour-marker").count() == 5
            assert page.locator("path.neighbour-marker.in-cluster").count() == 1
            items = page.locator("#neighbours li")
            assert items.count() == 5
            assert re.search(re.escape(want["matches"][0]["path"]), items.nth(0).inner_text())
            page.wait_for_function(
                "() => [...document.querySelectorAll('#neighbours img')].length === 5 && "
                "[...document.querySelectorAll('#neighbours img')].every((img) => img.complete && img.naturalWidth > 0)"
            )
            assert errors == [], errors
            assert all(not u.startswith(server) for u in blocked)
            page.screenshot(path=str(tmp_path / "street.png"))
            browser.close()
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
