"""What keeps `geoswc serve` safe to run: the hosts and origins it answers, the headers of its answers, the
memory budget of the uploads and pixels in flight, and refusals a client can read (a 413 that urllib sees,
a 400 for an over-long multipart boundary)."""

import asyncio
import io
import json
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import free_port  # noqa: E402
from geoswc.geolocator import Geolocator  # noqa: E402
from geoswc.serve import ServeSettings, create_app  # noqa: E402

LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Geolocator.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, ServeSettings(max_upload_mb=1.0)), base_url=LOCAL) as c:
        yield c


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _big_png(side: int = 7000) -> bytes:
    """A greyscale PNG of side x side pixels in a few tens of KB: under every pixel limit for a model input
    (49 MP < 50 MP), decoded at full size."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "PNG")
    return buffer.getvalue()


def _files(*named):
    return [("file", (name, data, "application/octet-stream")) for name, data in named]


# ---------------------------------------------------------------------------------------------- hosts, origins
def test_only_the_servers_own_host_names_are_answered(model):
    app = create_app(model, ServeSettings(host="127.0.0.1", allowed_hosts=("geo.lan",)))
    with TestClient(app, base_url=LOCAL) as c:
        for host in ["localhost", "127.0.0.1:8000", "[::1]:8000", "geo.lan", "GEO.LAN:80"]:
            assert c.get("/v1/model", headers={"host": host}).status_code == 200, host
        for host in [
            "attacker.example",
            "attacker.example:8000",
            "127.0.0.1.attacker.example",
            "geo.lan.evil",
        ]:
            assert c.get("/v1/model", headers={"host": host}).status_code == 400, host
            assert c.get("/", headers={"host": host}).status_code == 400, host


def test_the_cli_passes_bound_and_allowed_hosts():
    from geoswc.cli import build_parser

    args = build_parser("serve").parse_args(
        [
            "serve",
            "--model",
            "m",
            "--host",
            "10.0.0.5",
            "--allowed-host",
            "geo.lan",
            "--allowed-host",
            "x.lan",
        ]
    )
    assert args.allowed_host == ["geo.lan", "x.lan"] and args.tiles is None and args.max_decode_mb == 1024
    settings = ServeSettings(host=args.host, allowed_hosts=tuple(args.allowed_host))
    assert settings.trusted_hosts() == ["localhost", "127.0.0.1", "[::1]", "10.0.0.5", "geo.lan", "x.lan"]
    assert ServeSettings(host="0.0.0.0").trusted_hosts() == ["localhost", "127.0.0.1", "[::1]"]
    assert ServeSettings(host="::1").trusted_hosts() == ["localhost", "127.0.0.1", "[::1]"]


def test_a_cross_site_post_is_refused_with_one_json_line(client):
    photo = _jpeg(1)
    for origin in ["http://evil.example", "null", "http://localhost.evil.example", "https://localhost"]:
        response = client.post("/v1/locate", files=_files(("a.jpg", photo)), headers={"origin": origin})
        assert response.status_code == 403, origin
        detail = response.json()["detail"]
        assert "\n" not in detail and repr(origin) in detail and "http://localhost" in detail
    # The page's own origin, and clients that send none (curl, Python), are served.
    for headers in [{"origin": "http://localhost"}, {"origin": "http://localhost:80"}, {}]:
        response = client.post("/v1/locate", files=_files(("a.jpg", photo)), headers=headers)
        assert response.status_code == 200, headers
    assert client.get("/v1/model", headers={"origin": "http://evil.example"}).status_code == 200  # reads


def test_answers_carry_a_policy_against_inline_script_and_framing(client):
    for path in ["/", "/docs", "/v1/model", "/static/app.js"]:
        headers = client.get(path).headers
        policy = dict(d.strip().split(" ", 1) for d in headers["content-security-policy"].split(";"))
        assert policy["script-src"] == "'self'", path
        assert policy["frame-ancestors"] == "'none'" and policy["object-src"] == "'none'"
        assert policy["img-src"] == "'self' data: blob:"  # no tile server unless --tiles names one
        assert headers["x-content-type-options"] == "nosniff"
    # The pages run no inline script and no inline handler: every script is a file of the server.
    for path in ["/", "/docs"]:
        page = client.get(path).text
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, flags=re.S)
        assert scripts and all(re.fullmatch(r' src="/static/[\w./-]+\.js"', a) and not b for a, b in scripts)
        assert not re.search(r"\son\w+\s*=", page, flags=re.I)


def test_online_tiles_are_opt_in_and_allowed_by_the_policy_only_then(model):
    with TestClient(create_app(model, ServeSettings()), base_url=LOCAL) as c:
        assert c.get("/v1/model").json()["tile_url"] is None
    url = "https://{s}.tile.example.org/{z}/{x}/{y}.png"
    with TestClient(create_app(model, ServeSettings(tile_url=url)), base_url=LOCAL) as c:
        assert c.get("/v1/model").json()["tile_url"] == url
        assert (
            "img-src 'self' data: blob: https://*.tile.example.org;"
            in c.get("/").headers["content-security-policy"]
        )


def test_api_docs_need_no_other_host(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/static/api-docs.js" in page.text
    for text in [page.text, client.get("/static/api-docs.js").text]:
        assert "http://" not in text and "https://" not in text
    assert client.get("/redoc", follow_redirects=False).headers["location"] == "/docs"


# ---------------------------------------------------------------------------------------------- refusals
def test_an_over_long_multipart_boundary_is_a_400_naming_it(client):
    boundary = "b" * 5000
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'.encode()
    body += _jpeg(2) + f"\r\n--{boundary}--\r\n".encode()
    response = client.post(
        "/v1/locate", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "\n" not in detail and "boundary of 5000 characters" in detail and "1 to 70" in detail


@pytest.fixture(scope="module")
def live_server(model):
    import uvicorn

    app = create_app(model, ServeSettings(max_upload_mb=1.0))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start within 60 s"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def _urllib_post(url: str, body: bytes, boundary: str):
    request = urllib.request.Request(
        url + "/v1/locate",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_urllib_reads_the_413_of_an_oversized_upload(live_server):
    # urllib sends the whole body before it reads the answer: the server reads it (up to twice the limit)
    # so that the client sees the 413 and its message rather than a reset connection.
    boundary = "geoswc-test"
    filler = np.random.default_rng(0).integers(0, 255, int(1.6 * 2**20), dtype=np.uint8).tobytes()
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'.encode()
        + _jpeg(3)
        + filler
        + f"\r\n--{boundary}--\r\n".encode()
    )
    for _ in range(3):
        status, answer = _urllib_post(live_server, body, boundary)
        assert status == 413 and "max-upload-mb 1" in answer["detail"]
    small = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'.encode()
    status, answer = _urllib_post(
        live_server, small + _jpeg(4) + f"\r\n--{boundary}--\r\n".encode(), boundary
    )
    assert status == 200 and answer["results"][0]["status"] == "ok"  # the connection pool is still sound


# ---------------------------------------------------------------------------------------------- memory budget
def test_a_spent_memory_budget_is_a_503_with_retry_after(model):
    png = _big_png()
    assert len(png) < 200_000
    app = create_app(model, ServeSettings(max_decode_mb=600))
    budget = app.state.budget
    with TestClient(app, base_url=LOCAL) as c:
        # Another request holds most of the budget: a photo that decodes to 49 MP does not fit beside it.
        assert budget.try_take(400 * 2**20)
        response = c.post("/v1/locate", files=_files(("big.png", png)))
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "--max-decode-mb 600" in response.json()["detail"]
        budget.give_back(400 * 2**20)
        # Once it is given back the same request is served, and everything it reserved is returned.
        response = c.post("/v1/locate", files=_files(("big.png", png)))
        assert response.status_code == 200 and response.json()["results"][0]["status"] == "ok"
    assert budget.in_use_bytes == 0
    assert 7000 * 7000 * 3 < budget.peak_bytes <= 600 * 2**20


def test_a_photo_over_the_whole_budget_is_an_error_row_the_rest_is_located(model):
    with TestClient(create_app(model, ServeSettings(max_decode_mb=100)), base_url=LOCAL) as c:
        response = c.post("/v1/locate", files=_files(("big.png", _big_png()), ("a.jpg", _jpeg(5))))
    assert response.status_code == 200
    big, small = response.json()["results"]
    assert big["status"] == "error" and "--max-decode-mb 100" in big["error"] and "MiB" in big["error"]
    assert small["status"] == "ok"


@pytest.mark.slow
def test_concurrent_large_decodes_stay_within_the_budget(model):
    png = _big_png()
    app = create_app(model, ServeSettings(max_decode_mb=1024))

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL, timeout=600) as c:
            responses = await asyncio.gather(
                *(
                    c.post("/v1/locate", files=_files((f"{i}a.png", png), (f"{i}b.png", png)))
                    for i in range(8)
                )
            )
        await app.state.batcher.stop()
        return responses

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 503)
    budget = app.state.budget
    assert budget.in_use_bytes == 0 and budget.peak_bytes <= 1024 * 2**20 and budget.refused >= 1
