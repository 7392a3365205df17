"""The HTTP API of `geoswc serve`: the JSON rows, every refusal, the limits, and dynamic batching."""

import asyncio
import io
import json
import struct
import tempfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from geoswc.geolocator import Geolocator  # noqa: E402
from geoswc.serve import ServeSettings, create_app  # noqa: E402
from geoswc.geocells.polygons import EDGE_POINTS  # noqa: E402
from geoswc.tagging.output import COLUMNS, RowWriter, make_row  # noqa: E402


# The server answers only to its own names (DNS rebinding): the clients name it as a browser on this machine.
LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Geolocator.from_pretrained(tiny_model_dir, device="cpu")


def _jpeg(seed: int, size=(64, 48), tint=None) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    if tint is not None:
        pixels = np.clip(np.asarray(tint) + rng.normal(scale=40, size=pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with a few bytes of data (decoding would need
    width * height bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def _post(client, files, **form):
    return client.post(
        "/v1/locate",
        files=[("file", (name, data, "application/octet-stream")) for name, data in files],
        data={k: str(v) for k, v in form.items()},
    )


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, ServeSettings(max_upload_mb=1.0, max_files=4)), base_url=LOCAL) as c:
        yield c


def test_locate_row_has_the_tag_columns_and_matches_the_library(client, model, tmp_path):
    photo = _jpeg(1)
    response = _post(client, [("holiday.jpg", photo)], mode="swc", top_k=3, head="ce")
    assert response.status_code == 200
    body = response.json()
    assert body["head"] == "ce" and body["mode"] == "swc"
    (row,) = body["results"]
    # Every column of a geoswc tag row, then the server's additions.
    assert list(row)[: len(COLUMNS)] == list(COLUMNS)
    assert row["path"] == "holiday.jpg" and row["status"] == "ok" and row["error"] == ""
    assert {"cells", "neighbours", "head", "mode", "confidence_words"} <= set(row)
    # The library, reading the same bytes from a file (load_photo, PhotoDataset), places it identically.
    path = tmp_path / "holiday.jpg"
    path.write_bytes(photo)
    (expected,) = model.predict([str(path)], head="ce", mode="swc", top_k=3)
    assert row["lat"] == pytest.approx(expected["lat"], abs=1e-9)
    assert row["lon"] == pytest.approx(expected["lon"], abs=1e-9)
    assert row["method"] == expected["method"] and row["cell_token"] == expected["cell_token"]
    assert row["cell_probability"] == pytest.approx(expected["cell_prob"])
    assert [c["token"] for c in row["cells"]] == [c["token"] for c in expected["top_cells"]]
    assert len(row["cells"]) == 3
    assert [n["id"] for n in row["neighbours"]] == [n["id"] for n in expected["neighbours"]]


def test_cell_polygons_are_the_s2_cells(client):
    s2sphere = pytest.importorskip("s2sphere")
    from matplotlib.path import Path

    row = _post(client, [("a.jpg", _jpeg(2))], top_k=5).json()["results"][0]
    for cell in row["cells"]:
        polygon = np.asarray(cell["polygon"])
        assert polygon.shape == (4 * EDGE_POINTS, 2)
        s2cell = s2sphere.Cell(s2sphere.CellId.from_token(cell["token"]))
        for k in range(4):
            vertex = s2sphere.LatLng.from_point(s2cell.get_vertex(k))
            lat, lon = polygon[k * EDGE_POINTS]
            assert lat == pytest.approx(vertex.lat().degrees, abs=1e-5)
            assert (lon - vertex.lng().degrees + 180) % 360 - 180 == pytest.approx(0.0, abs=1e-5)
        centre = s2sphere.LatLng.from_point(s2cell.get_center())
        assert Path(polygon[:, ::-1]).contains_point((centre.lng().degrees, centre.lat().degrees))
    probabilities = [c["probability"] for c in row["cells"]]
    assert probabilities == sorted(probabilities, reverse=True)


def test_neighbours_carry_distances_and_the_cluster(client):
    haversine = pytest.importorskip("haversine")
    # Restricted to Paris, where the background photos are, Search within Cell finds neighbours.
    row = _post(client, [("a.jpg", _jpeg(3))], head="ce", area="48,1,50,4").json()["results"][0]
    assert row["method"] == "swc" and row["neighbours"]
    assert any(n["in_cluster"] for n in row["neighbours"])
    # The tag row's review columns are filled as geoswc tag fills them: place names, alternatives, evidence.
    assert row["country_code"] == "FR" and row["country"] == "France"
    assert [c["token"] for c in row["top_cells"]] == [c["token"] for c in row["cells"]]
    assert [e["id"] for e in row["evidence"]] == [n["id"] for n in row["neighbours"]]
    members = np.array([[n["lat"], n["lon"]] for n in row["neighbours"] if n["in_cluster"]])
    # The prediction is the mean of the winning cluster.
    assert np.allclose(members.mean(axis=0), [row["lat"], row["lon"]], atol=0.05)
    for n in row["neighbours"]:
        expected = haversine.haversine((row["lat"], row["lon"]), (n["lat"], n["lon"]))
        assert n["distance_km"] == pytest.approx(expected, rel=1e-3)
        assert n["thumbnail"] is None  # no --images


def test_area_filter_keeps_only_cells_inside(client, model):
    south, west, north, east = 48.0, 1.0, 50.0, 4.0
    row = _post(
        client, [("a.jpg", _jpeg(4))], head="ce", mode="cell", top_k=50, area=f"{south},{west},{north},{east}"
    )
    row = row.json()["results"][0]
    centers = np.asarray(model.head_partition("ce").centers_deg)
    inside = [
        i
        for i, (lat, lon) in enumerate(centers)
        if south <= lat <= north and west <= lon <= east  # the box, by hand
    ]
    assert sorted(c["cell_idx"] for c in row["cells"]) == sorted(inside)
    assert sum(c["probability"] for c in row["cells"]) == pytest.approx(1.0, abs=1e-5)
    best = row["cells"][0]["cell_idx"]
    assert (row["lat"], row["lon"]) == pytest.approx(tuple(centers[best]))
    # A box that crosses the antimeridian and holds no cell centre is refused, naming the area.
    response = _post(client, [("a.jpg", _jpeg(4))], head="ce", area="-10,170,10,-170")
    assert response.status_code == 422 and "no cell" in response.json()["detail"]


def test_one_bad_photo_does_not_fail_the_others(client):
    files = [
        ("good.jpg", _jpeg(5)),
        ("notes.txt", b"not a photo at all"),
        ("empty.jpg", b""),
        ("b.jpg", _jpeg(6)),
    ]
    response = _post(client, files)
    assert response.status_code == 200
    rows = response.json()["results"]
    assert [r["path"] for r in rows] == ["good.jpg", "notes.txt", "empty.jpg", "b.jpg"]
    assert [r["status"] for r in rows] == ["ok", "error", "error", "ok"]
    assert "not a recognised image" in rows[1]["error"] and rows[1]["lat"] is None
    assert rows[2]["error"] == "empty file"


def test_non_image_is_a_4xx_naming_the_problem(client):
    response = _post(client, [("notes.txt", b"hello")])
    assert response.status_code == 415
    assert "notes.txt: not a recognised image" in response.json()["detail"]
    truncated = _jpeg(7)[:300]
    response = _post(client, [("cut.jpg", truncated)])
    assert response.status_code == 422
    assert response.json()["results"][0]["error"].startswith("JPEG")


def test_decompression_bombs_are_refused(client):
    # 400 MP: over Pillow's own limit; 64 MP: under it, but over MAX_TARGET_PIXELS for a model input.
    for (width, height), reason in [((20_000, 20_000), "decompression bomb"), ((8_000, 8_000), "8000x8000")]:
        bomb = _png_bomb(width, height)
        assert len(bomb) < 2000
        response = _post(client, [("bomb.png", bomb)])
        assert response.status_code == 422
        error = response.json()["results"][0]["error"]
        assert error.startswith("PNG") and reason in error


@pytest.mark.parametrize(
    "form, words",
    [
        ({"head": "vmff"}, ["unknown head 'vmff'", "ce, hc, mvmf"]),
        ({"mode": "knn"}, ["unknown mode 'knn'", "swc, cell, rrm"]),
        ({"top_k": "0"}, ["top_k", "1 to 50"]),
        ({"top_k": "many"}, ["top_k"]),
        ({"area": "1,2,3"}, ["south,west,north,east"]),
        ({"area": "50,1,48,4"}, ["south <= north"]),
        ({"min_confidence": "1.5"}, ["min_confidence", "from 0 to 1", "'1.5'"]),
        ({"min_confidence": "-0.1"}, ["min_confidence", "from 0 to 1"]),
        ({"min_confidence": "nan"}, ["min_confidence", "'nan'"]),
        ({"min_confidence": "high"}, ["min_confidence", "'high'"]),
    ],
)
def test_bad_options_are_422_naming_the_choices(client, form, words):
    response = _post(client, [("a.jpg", _jpeg(8))], **form)
    assert response.status_code == 422
    for word in words:
        assert word in response.json()["detail"]


def test_requests_without_photos_or_multipart_are_refused(client):
    response = client.post("/v1/locate", data={"head": "ce"})
    assert response.status_code in (415, 422)
    response = client.post("/v1/locate", files=[("photo", ("a.jpg", _jpeg(9), "image/jpeg"))])
    assert response.status_code == 422 and "'file'" in response.json()["detail"]
    response = client.post("/v1/locate", content=b"{}", headers={"content-type": "application/json"})
    assert response.status_code == 415 and "multipart/form-data" in response.json()["detail"]
    response = client.post(
        "/v1/locate", content=b"--xx\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=zz"}
    )
    assert response.status_code in (400, 422)
    response = _post(client, [(f"{i}.jpg", _jpeg(i)) for i in range(5)])
    assert response.status_code == 413 and "limit is 4" in response.json()["detail"]
    assert client.get("/healthz").json()["status"] == "ok"  # still serving


def test_body_over_the_limit_is_413_from_its_content_length(client):
    big = _jpeg(10, size=(64, 48)) + b"\0" * (2 * 1024 * 1024)
    response = _post(client, [("big.jpg", big)])
    assert response.status_code == 413 and "max-upload-mb 1" in response.json()["detail"]


def test_streamed_body_over_the_limit_is_413_without_reading_it_whole(model):
    app = create_app(model, ServeSettings(max_upload_mb=0.25))
    chunk, n_chunks = 64 * 1024, 64  # 4 MiB offered, 0.25 MiB allowed
    sent = []

    async def body():
        yield b'--BOUNDARY\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n'
        for _ in range(n_chunks):
            sent.append(chunk)
            yield b"\xff" * chunk

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as c:
            return await c.post(
                "/v1/locate",
                content=body(),
                headers={"content-type": "multipart/form-data; boundary=BOUNDARY"},
            )

    response = asyncio.run(go())
    assert response.status_code == 413
    # Reading stopped just past the limit: 5 chunks of 64 KiB, not the 64 offered.
    assert len(sent) <= 6


def test_uploads_are_kept_only_when_asked(model, tmp_path, monkeypatch):
    photo = _jpeg(11, size=(1600, 1200))
    noise = np.random.default_rng(0).integers(0, 255, 1_500_000, dtype=np.uint8).tobytes()
    photo = (
        photo + noise
    )  # bytes after the JPEG's end are ignored by decoders; 1.5 MB rolls any spool to disk
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with TestClient(create_app(model, ServeSettings()), base_url=LOCAL) as c:
        assert _post(c, [("big.jpg", photo)]).json()["results"][0]["status"] == "ok"
    assert list(scratch.iterdir()) == []
    kept = tmp_path / "kept"
    with TestClient(create_app(model, ServeSettings(keep_uploads=str(kept))), base_url=LOCAL) as c:
        assert _post(c, [("../../evil name.jpg", photo)]).json()["results"][0]["status"] == "ok"
    (saved,) = list(kept.iterdir())
    assert saved.read_bytes() == photo and saved.name.endswith("-evil name.jpg")


def test_concurrent_requests_share_forward_passes(model, monkeypatch):
    calls = []
    features = model.features

    def counted(pixels):
        # Backbone passes, whatever runs them (PyTorch or ONNX Runtime, which a module hook does not see).
        calls.append(len(pixels))
        return features(pixels)

    monkeypatch.setattr(model, "features", counted)
    photos = [_jpeg(100 + i) for i in range(12)]

    async def burst(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL, timeout=60) as c:
            responses = await asyncio.gather(
                *(
                    c.post("/v1/locate", files={"file": (f"{i}.jpg", p, "image/jpeg")})
                    for i, p in enumerate(photos)
                )
            )
        await app.state.batcher.stop()
        return [r.json()["results"][0] for r in responses]

    batched_app = create_app(model, ServeSettings(max_batch=32, batch_wait_ms=200))
    batched = asyncio.run(burst(batched_app))
    batched_calls = list(calls)
    calls.clear()
    single_app = create_app(model, ServeSettings(max_batch=1, batch_wait_ms=0))
    single = asyncio.run(burst(single_app))
    single_calls = list(calls)
    # One forward pass per photo without batching; the burst shares far fewer with it, and no photo is lost.
    assert single_calls == [1] * 12
    assert sum(batched_calls) == 12 and len(batched_calls) < 12 and max(batched_calls) > 1
    assert batched_app.state.batcher.stats.items == 12
    assert batched_app.state.batcher.stats.batches == len(batched_calls)
    # Sharing a batch does not change a photo's answer.
    for a, b in zip(batched, single):
        assert a["status"] == b["status"] == "ok"
        assert a["cell_token"] == b["cell_token"]
        assert a["lat"] == pytest.approx(b["lat"], abs=1e-4) and a["lon"] == pytest.approx(b["lon"], abs=1e-4)


def test_model_description_health_and_openapi(client, model):
    info = client.get("/v1/model").json()
    assert info["heads"] == ["ce", "hc", "mvmf"] and info["default_head"] == "mvmf"
    assert info["fingerprint"] == model.fingerprint
    assert info["background_size"] == len(model.index.ids)
    assert info["backbone"] == "test_efficientnet"
    assert [p["cells"] for p in info["partitions"]] == [
        len(model.geocells.partition(n)) for n in model.geocells.names
    ]
    assert info["modes"] == ["swc", "cell", "rrm"]
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/locate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"file", "head", "mode", "top_k", "area", "min_confidence"} <= set(body["properties"])
    assert {"/v1/model", "/healthz"} <= set(spec["paths"])


def test_page_static_files_and_basemap_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/vendor/leaflet/leaflet.js" in page.text
    for path in [
        "/static/app.js",
        "/static/app.css",
        "/static/vendor/leaflet/leaflet.js",
        "/static/vendor/topojson-client/topojson-client.min.js",
        "/static/vendor/leaflet.markercluster/leaflet.markercluster.js",
    ]:
        assert client.get(path).status_code == 200, path
    topo = client.get("/basemap/countries-50m.json").json()
    assert topo["type"] == "Topology" and len(topo["objects"]["countries"]["geometries"]) == 241


def test_thumbnails_of_background_photos_only(model, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    some_id = str(model.index.ids[0])
    Image.new("RGB", (640, 480), (200, 30, 30)).save(root / some_id, "JPEG")
    (tmp_path / "secret.jpg").write_bytes((root / some_id).read_bytes())
    with TestClient(create_app(model, ServeSettings(images=str(root))), base_url=LOCAL) as c:
        response = c.get("/v1/thumbnail", params={"id": some_id})
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(response.content)).size) <= 192
        assert c.get("/v1/thumbnail", params={"id": "../secret.jpg"}).status_code == 404
        missing = str(model.index.ids[1])
        assert c.get("/v1/thumbnail", params={"id": missing}).status_code == 404  # no file
        row = _post(c, [("a.jpg", _jpeg(3))], head="ce", area="48,1,50,4").json()["results"][0]
        assert all(n["thumbnail"].startswith("/v1/thumbnail?id=") for n in row["neighbours"])
    with TestClient(create_app(model, ServeSettings()), base_url=LOCAL) as c:
        assert c.get("/v1/thumbnail", params={"id": some_id}).status_code == 404


def test_tag_run_view_serves_its_rows_and_photos(model, tmp_path):
    photo = tmp_path / "p.jpg"
    photo.write_bytes(_jpeg(12))
    tags = tmp_path / "tags.csv"
    with RowWriter(str(tags), "csv") as writer:
        writer.write(
            [
                make_row(
                    str(photo), prediction={"lat": 48.85, "lon": 2.35, "method": "swc", "cell_token": "47e6"}
                ),
                make_row(str(tmp_path / "gone.jpg"), error="file not found"),
            ]
        )
    with TestClient(create_app(model, ServeSettings(tags=str(tags))), base_url=LOCAL) as c:
        body = c.get("/v1/tags").json()
        assert [r["status"] for r in body["rows"]] == ["ok", "error"]
        assert body["rows"][0]["lat"] == pytest.approx(48.85)
        assert c.get("/v1/tags/photo", params={"i": 0}).headers["content-type"] == "image/jpeg"
        assert c.get("/v1/tags/photo", params={"i": 1}).status_code == 404
        assert c.get("/v1/tags/photo", params={"i": 7}).status_code == 404
        assert c.get("/v1/model").json()["tags"] == {"file": "tags.csv"}


def test_cli_registers_serve_on_localhost(tmp_path, capsys):
    from geoswc.cli import build_parser, main

    args = build_parser("serve").parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.max_upload_mb, args.keep_uploads) == ("127.0.0.1", 8000, 25.0, None)
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_row_json_is_strict(client):
    # rrm without a head has no confidence: null, not NaN, so that strict JSON parsers accept the body.
    response = _post(client, [("a.jpg", _jpeg(13))], mode="rrm")
    json.loads(response.text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert torch.isfinite(torch.tensor(response.json()["results"][0]["lat"]))


def test_demo_prints_the_serve_command_of_its_model(tmp_path):
    import shlex

    from geoswc.cli import build_parser
    from geoswc.demo import serve_command

    model_dir, images, tags = tmp_path / "my demo" / "model", tmp_path / "images", tmp_path / "tags.csv"
    words = shlex.split(serve_command(model_dir, images, tags))
    assert words[:2] == ["geoswc", "serve"]
    args = build_parser("serve").parse_args(words[1:])
    assert (args.model, args.images, args.tags, args.host) == (
        str(model_dir),
        str(images),
        str(tags),
        "127.0.0.1",
    )


def test_batch_buckets_are_powers_of_two_up_to_the_limit():
    from geoswc.serve.app import batch_bucket

    assert [batch_bucket(n, 32) for n in (1, 2, 3, 5, 8, 9, 17, 32)] == [1, 2, 4, 8, 8, 16, 32, 32]
    assert [batch_bucket(n, 12) for n in (3, 9, 12)] == [4, 12, 12]


def test_batcher_isolates_each_items_failure():
    from geoswc.serve.batching import DynamicBatcher

    def process(items):
        return [ValueError(f"bad {x}") if x < 0 else x * 10 for x in items]

    async def go():
        batcher = DynamicBatcher(process, max_batch=8, max_wait_ms=50)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(x) for x in (1, -2, 3)), return_exceptions=True)
        await batcher.stop()
        return results, batcher.stats

    (a, b, c), stats = asyncio.run(go())
    assert (a, c) == (10, 30) and isinstance(b, ValueError) and str(b) == "bad -2"
    assert (stats.batches, stats.items) == (1, 3)


def test_cells_in_area_by_hand_including_the_antimeridian():
    from geoswc.geolocator import cells_in_area

    centers = np.array([[48.9, 2.3], [-17.8, 178.0], [-17.0, -179.5], [35.7, 139.7], [0.0, 0.0]])
    assert cells_in_area(centers, (40, -5, 55, 10)).tolist() == [True, False, False, False, False]
    # West > east: the box runs from 170 E across 180 to 170 W (Fiji).
    assert cells_in_area(centers, (-25, 170, -10, -170)).tolist() == [False, True, True, False, False]
    # Edges are inside.
    assert cells_in_area(centers, (0, 0, 0, 0)).tolist() == [False, False, False, False, True]
    with pytest.raises(ValueError, match="no cell"):
        cells_in_area(centers, (-80, -60, -70, -50))
    with pytest.raises(ValueError, match="south <= north"):
        cells_in_area(centers, (10, 0, -10, 5))
    with pytest.raises(ValueError, match="four numbers"):
        cells_in_area(centers, (1, 2, float("nan"), 3))


def test_min_confidence_abstains_keeping_the_normal_prediction_as_the_guess(client):
    photo = [("a.jpg", _jpeg(11))]
    form = {"head": "ce", "top_k": 3, "area": "48,1,50,4"}
    plain = _post(client, photo, **form).json()["results"][0]
    assert plain["status"] == "ok" and plain["guess_lat"] is None and plain["guess_lon"] is None
    confidence = plain["confidence"]
    assert 0.0 < confidence < 1.0

    response = _post(client, photo, **form, min_confidence=1.0)
    assert response.status_code == 200  # an abstention is an answer, not a failure
    row = response.json()["results"][0]
    assert row["status"] == "abstain" and row["lat"] is None and row["lon"] is None
    assert (row["guess_lat"], row["guess_lon"]) == (plain["lat"], plain["lon"])
    # Everything else a reviewer needs stays: the place of the guess, the alternatives, the evidence.
    for key in [
        "method",
        "cell_token",
        "confidence",
        "place",
        "country_code",
        "top_cells",
        "evidence",
        "cells",
    ]:
        assert row[key] == plain[key], key

    # The threshold is inclusive, as geoswc tag's: at the row's own confidence it is placed, just above not.
    assert _post(client, photo, **form, min_confidence=0).json()["results"][0]["status"] == "ok"
    assert (
        _post(client, photo, **form, min_confidence=repr(confidence)).json()["results"][0]["status"] == "ok"
    )
    above = repr(float(np.nextafter(confidence, 1.0)))
    assert _post(client, photo, **form, min_confidence=above).json()["results"][0]["status"] == "abstain"
    # Blank is no threshold; the option may also be a query parameter.
    assert _post(client, photo, **form, min_confidence="").json()["results"][0]["status"] == "ok"
    files = [("file", ("a.jpg", photo[0][1], "image/jpeg"))]
    row = client.post("/v1/locate?min_confidence=1", files=files).json()["results"][0]
    assert row["status"] == "abstain"


def _great_circle_km(a, b):
    """Haversine distance on the sphere of radius 6371 km (geoswc's; the haversine package uses 6371.0088)."""
    (lat1, lon1), (lat2, lon2) = np.radians(a), np.radians(b)
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return float(2 * 6371.0 * np.arcsin(np.sqrt(h)))


def test_uploads_exif_gps_is_reported_with_its_distance(client, tmp_path):
    from geoswc.tagging.exif_copies import write_gps_exif

    # 48.8584 N 2.2945 E is 48 51' 30.24", 2 17' 40.2"; 40.7484 N 73.9857 W is 40 44' 54.24", 73 59' 8.52":
    # whole hundredths of a second of arc, which the EXIF rationals hold exactly.
    geotags = {"eiffel.jpg": (48.8584, 2.2945), "empire.jpg": (40.7484, -73.9857)}
    files = []
    for seed, (name, (lat, lon)) in enumerate(geotags.items()):
        plain = tmp_path / f"plain-{name}"
        plain.write_bytes(_jpeg(20 + seed))
        write_gps_exif(str(plain), str(tmp_path / name), lat, lon)
        files.append((name, (tmp_path / name).read_bytes()))
    files.append(("no-gps.jpg", _jpeg(22)))
    for form in [{}, {"min_confidence": 1.0}]:
        rows = _post(client, files, head="ce", **form).json()["results"]
        for row, (name, _) in zip(rows, files):
            assert row["path"] == name and row["status"] == ("abstain" if form else "ok")
            if name not in geotags:
                assert row["exif_lat"] is None and row["exif_lon"] is None and row["exif_distance_km"] is None
                continue
            lat, lon = geotags[name]
            assert (row["exif_lat"], row["exif_lon"]) == (lat, lon)
            # The distance is from the prediction, or from the guess of an abstention.
            predicted = (
                (row["lat"], row["lon"]) if row["status"] == "ok" else (row["guess_lat"], row["guess_lon"])
            )
            # Rounded to metres; a degree of latitude is 111.19 km.
            assert row["exif_distance_km"] == pytest.approx(_great_circle_km(predicted, (lat, lon)), abs=1e-3)


def test_exif_gps_of_other_formats_and_damaged_headers(client):
    # A PNG's eXIf chunk, written by Pillow: degrees, minutes, seconds with the S and W references.
    exif = Image.Exif()
    exif[0x8825] = {1: "S", 2: (33.0, 51.0, 24.42), 3: "W", 4: (70.0, 39.0, 0.0)}
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
        buffer, "PNG", exif=exif
    )
    # A JPEG whose APP1 segment says Exif but holds garbage: no position, and the photo is still placed.
    jpeg = _jpeg(12)
    damaged = jpeg[:2] + b"\xff\xe1\x00\x10Exif\x00\x00garbage!" + jpeg[2:]
    rows = _post(client, [("south-west.png", buffer.getvalue()), ("damaged.jpg", damaged)]).json()["results"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["exif_lat"] == pytest.approx(-(33 + 51 / 60 + 24.42 / 3600), abs=1e-7)
    assert rows[0]["exif_lon"] == pytest.approx(-(70 + 39 / 60), abs=1e-7)
    assert rows[1]["exif_lat"] is None and rows[1]["exif_distance_km"] is None
