"""The HTTP API (DESIGN §4) against a real `simmim serve` on a loopback port, one server (two
processes) for the module, on the dummy backend (tests/dummy_backend.py) and the embedded
model's directory: every endpoint, encodings, formats, errors and limits. What the model itself
answers is specified in test_service_model.py."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps
from service_fixtures import (
    API_KEY,
    DummyReference,
    ServerProcess,
    encode,
    make_image,
    png_bytes,
    unit,
    wait_until,
)

from service.app import without_paths
from service.settings import default_model_path
from simmim_core.preprocess import denormalize
from simmim_core.visualize import GAP, PANEL_MIN

LIMITS = {
    "SIMMIM_MAX_IMAGES": "8",
    "SIMMIM_MAX_QUEUE": "64",
    "SIMMIM_MAX_BATCH_SIZE": "8",
    "SIMMIM_MAX_PIXELS": "1000000",
    "SIMMIM_MAX_DECODE_PIXELS": "500000",
    "SIMMIM_MAX_REQUEST_BYTES": "1500000",
    "SIMMIM_MAX_WAIT_MS": "1",
    "SIMMIM_LOG_JSON": "true",
}
MODEL_DIR = default_model_path()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(
        MODEL_DIR, tmp_path_factory.mktemp("api"), env=LIMITS, dummy=True, processes=2
    ) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def ref():
    return DummyReference(MODEL_DIR)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def embed(server, images: list[bytes], **options) -> np.ndarray:
    r = server.http.post("/embed", json={"images": [b64(i) for i in images], **options})
    assert r.status_code == 200, r.text
    return np.array(r.json()["embeddings"], np.float32)


def assert_serving(server, ref) -> None:
    """The server still answers a good request correctly."""
    image = png_bytes(99)
    np.testing.assert_allclose(
        embed(server, [image], normalize=False), ref.embed([image]), atol=1e-5, rtol=0
    )


# --- health, auth, info, metrics, docs --------------------------------------------------------
def test_health_live_and_ready_answer_200_without_a_key(server):
    for path, status in (("/health/live", "live"), ("/health/ready", "ready")):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.json() == {"status": status}


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-key", f"Basic {API_KEY}", f"Bearer {API_KEY}x"]
)
@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/embed"),
        ("GET", "/info"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/redoc"),
    ],
)
def test_missing_or_wrong_api_key_gets_401(server, authorization, method, path):
    headers = {"Authorization": authorization} if authorization else {}
    r = httpx.request(
        method, server.url + path, headers=headers, json={"images": [b64(png_bytes(0))]}
    )
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"


def test_info_shows_the_card_settings_and_runtime_but_not_the_key(server):
    r = server.http.get("/info")
    assert r.status_code == 200
    info = r.json()
    card = json.loads((MODEL_DIR / "model.json").read_text())
    assert info["model"] == without_paths(card)  # the training machine's folders cut
    assert info["settings"]["max_batch_size"] == 8 and info["settings"]["max_images"] == 8
    assert info["settings"]["api_key_set"] is True and "api_key" not in info["settings"]
    assert API_KEY not in r.text
    assert info["state"] == "ready"
    assert info["backend"]["runtime"] == "dummy (tests/dummy_backend.py)"
    assert info["backend"]["workers"] == 2 and info["backend"]["max_batch_size"] == 8


def strings(value) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_info_shows_no_path_of_the_servers_filesystem(server):
    info = server.http.get("/info").json()
    assert info["settings"]["model_dir"] == MODEL_DIR.name
    assert not [s for s in strings(info) if re.search(r"(^|[\s=])/\w", s)]


def test_metrics_cover_requests_queue_batches_inference_and_images(server):
    before = server.metric("simmim_images_total", task="embed")
    embed(server, [png_bytes(i) for i in range(3)])
    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in (
        "simmim_requests_total",
        "simmim_request_duration_seconds_bucket",
        "simmim_queue_depth",
        "simmim_queue_capacity",
        "simmim_running_items",
        "simmim_queue_wait_seconds_bucket",
        "simmim_batch_size_bucket",
        "simmim_inference_seconds_bucket",
        "simmim_items_dropped_total",
        "simmim_failed_batches_total",
        "simmim_ready",
    ):
        assert f"\n{name}" in r.text, name
    assert server.metric("simmim_images_total", task="embed") == before + 3
    assert server.metric("simmim_requests_total", endpoint="/embed", status="200") >= 1
    assert server.metric("simmim_ready") == 1
    # per task, summed over the 2 processes: the denominator of the queue's fill
    assert server.metric("simmim_queue_capacity", task="embed") == 2 * 64


def test_docs_and_openapi_are_served_and_list_every_endpoint(server):
    assert server.http.get("/docs").status_code == 200  # with the key (docs: key)
    assert server.http.get("/redoc").status_code == 200
    paths = server.http.get("/openapi.json").json()["paths"]
    for path in (
        "/embed",
        "/similarity",
        "/reconstruct",
        "/health/live",
        "/health/ready",
        "/info",
        "/metrics",
    ):
        assert path in paths
    body = paths["/embed"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)


def test_openapi_documents_non_empty_image_lists_and_the_401s(server):
    paths = server.http.get("/openapi.json").json()["paths"]
    for path, field in (("/embed", "images"), ("/similarity", "a")):
        for content in paths[path]["post"]["requestBody"]["content"].values():
            assert content["schema"]["properties"][field]["minItems"] == 1, (path, field)
    for path, method in (("/info", "get"), ("/metrics", "get"), ("/embed", "post")):
        assert "401" in paths[path][method]["responses"], path


def test_reconstruct_documents_the_paste_visible_option(server):
    paths = server.http.get("/openapi.json").json()["paths"]
    body = paths["/reconstruct"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    option = body["properties"]["paste_visible"]
    assert option["type"] == "boolean" and option["default"] is True
    assert "raw decoder output" in option["description"]


# --- the page at / ---------------------------------------------------------------------------
def test_the_page_is_served_without_the_key_and_may_load_only_this_servers_files(server):
    r = httpx.get(server.url + "/")  # no Authorization header: the page asks for the key
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = dict(
        part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert {policy[k] for k in ("script-src", "style-src", "connect-src")} == {"'self'"}
    assert "/" not in server.http.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "path, media_types",
    [
        ("/page/page.js", ("text/javascript", "application/javascript")),  # a module needs one
        ("/page/page.css", ("text/css",)),
    ],
)
def test_the_pages_script_and_style_are_served_without_the_key(server, path, media_types):
    r = httpx.get(server.url + path)
    assert r.status_code == 200 and r.headers["content-type"].startswith(media_types)
    assert f'"{path[1:]}"' in httpx.get(server.url + "/").text  # the page links to it


def test_a_missing_page_file_is_404(server):
    assert httpx.get(server.url + "/page/nothing.js").status_code == 404


def test_request_id_is_echoed_or_generated(server):
    r = server.http.get("/health/live", headers={"X-Request-ID": "client-id-1"})
    assert r.headers["x-request-id"] == "client-id-1"
    generated = server.http.get("/health/live").headers["x-request-id"]
    assert len(generated) == 16 and generated != "client-id-1"
    assert server.http.get("/health/live").headers["x-request-id"] != generated


def test_one_json_log_line_per_request_with_id_status_and_timings(server):
    r = server.http.post(
        "/embed",
        json={"images": [b64(png_bytes(1))] * 2},
        headers={"X-Request-ID": "log-line-test"},
    )
    assert r.status_code == 200
    for header in (
        "x-decode-time-ms",
        "x-queue-time-ms",
        "x-inference-time-ms",
        "x-serialize-time-ms",
    ):
        assert float(r.headers[header]) >= 0

    def access_lines():
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        return [e for e in lines if e.get("request_id") == "log-line-test"]

    [entry] = wait_until(access_lines, "the access log line")
    assert entry["logger"] == "simmim.access" and entry["message"] == "POST /embed"
    assert entry["status"] == 200 and entry["images"] == 2
    for key in ("duration_ms", "decode_ms", "queue_ms", "inference_ms", "serialize_ms"):
        assert entry[key] >= 0


def test_without_log_requests_only_failed_requests_are_logged_at_info(tmp_path):
    env = {"SIMMIM_LOG_REQUESTS": "false", "SIMMIM_LOG_JSON": "true", "SIMMIM_LOG_LEVEL": "debug"}
    with ServerProcess(MODEL_DIR, tmp_path, env=env, dummy=True, api_key=None) as quiet:
        quiet.wait_ready()
        ok = quiet.http.post(
            "/embed", json={"images": [b64(png_bytes(1))]}, headers={"X-Request-ID": "quiet-ok"}
        )
        bad = quiet.http.post(
            "/embed", json={"images": "not a list"}, headers={"X-Request-ID": "quiet-bad"}
        )
        assert (ok.status_code, bad.status_code) == (200, 422)

        def levels():
            lines = [json.loads(line) for line in quiet.log().splitlines() if line.startswith("{")]
            found = {
                e["request_id"]: e["level"]
                for e in lines
                if e.get("request_id", "").startswith("quiet-")
            }
            return found if len(found) == 2 else None

        assert wait_until(levels, "both access log lines") == {
            "quiet-ok": "debug",
            "quiet-bad": "info",
        }


# --- /embed ------------------------------------------------------------------------------------
def test_embed_normalizes_by_default(server, ref):
    images = [png_bytes(i) for i in range(3)]
    vectors = embed(server, images)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vectors, unit(ref.embed(images)), atol=1e-5, rtol=0)


def test_base64_and_float_encodings_agree_exactly(server):
    images = [b64(png_bytes(i)) for i in range(3)]
    floats = server.http.post("/embed", json={"images": images}).json()["embeddings"]
    encoded = server.http.post("/embed", json={"images": images, "encoding": "base64"}).json()[
        "embeddings"
    ]
    decoded = np.stack([np.frombuffer(base64.b64decode(e), "<f4") for e in encoded])
    np.testing.assert_array_equal(decoded, np.array(floats, np.float32))


def test_multipart_files_json_base64_and_data_uris_agree(server):
    images = [png_bytes(i) for i in range(3)]
    r = server.http.post(
        "/embed",
        files=[("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)],
        data={"normalize": "false"},
    )
    assert r.status_code == 200, r.text
    from_files = np.array(r.json()["embeddings"], np.float32)
    uris = [f"data:image/png;base64,{b64(i)}" for i in images]
    from_uris = np.array(
        server.http.post("/embed", json={"images": uris, "normalize": False}).json()["embeddings"],
        np.float32,
    )
    np.testing.assert_array_equal(from_files, embed(server, images, normalize=False))
    np.testing.assert_array_equal(from_uris, from_files)


IMAGE_KINDS = {  # name: (format, mode, save options)
    "jpeg-rgb": ("JPEG", "RGB", {"quality": 90}),
    "jpeg-gray": ("JPEG", "L", {}),
    "jpeg-cmyk": ("JPEG", "CMYK", {}),
    "png-rgba": ("PNG", "RGBA", {}),
    "png-palette": ("PNG", "P", {}),
    "png-gray-alpha": ("PNG", "LA", {}),
    "png-16bit": ("PNG", "I;16", {}),
    "webp": ("WEBP", "RGB", {"lossless": True}),
    "bmp": ("BMP", "RGB", {}),
    "tiff": ("TIFF", "RGB", {}),
    "gif": ("GIF", "P", {}),
}


def _image_of_kind(kind: str) -> bytes:
    fmt, mode, options = IMAGE_KINDS[kind]
    img = make_image(7, (64, 52))
    if mode == "I;16":
        return encode(Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257), fmt)
    if mode in ("RGBA", "LA"):
        img = img.convert(mode)
        img.putalpha(Image.linear_gradient("L").resize(img.size))
        return encode(img, fmt)
    if fmt == "GIF":  # two frames: the first one counts
        frames = [img.convert("P"), make_image(8, (64, 52)).convert("P")]
        return encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    return encode(img.convert(mode), fmt, **options)


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_every_supported_format_and_mode_is_served_like_the_shared_preprocessing(server, ref, kind):
    data = _image_of_kind(kind)
    np.testing.assert_allclose(
        embed(server, [data], normalize=False), ref.embed([data]), atol=1e-5, rtol=0
    )


def test_exif_orientation_is_applied(server):
    img = make_image(3, (60, 36))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated_by_exif = encode(img, "PNG", exif=exif)
    upright = encode(ImageOps.exif_transpose(Image.open(io.BytesIO(rotated_by_exif))), "PNG")
    a, b, c = embed(server, [rotated_by_exif, upright, encode(img, "PNG")])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("size", [(1, 1), (1, 300), (300, 2), (31, 33)])
def test_tiny_and_extreme_aspect_images_are_served(server, ref, size):
    data = png_bytes(5, size)
    np.testing.assert_allclose(
        embed(server, [data], normalize=False), ref.embed([data]), atol=1e-5, rtol=0
    )
    assert_serving(server, ref)


# --- /similarity ---------------------------------------------------------------------------
def test_similarity_of_a_with_itself_is_symmetric_with_unit_diagonal(server, ref):
    images = [png_bytes(i) for i in range(4)]
    r = server.http.post("/similarity", json={"a": [b64(i) for i in images]})
    scores = np.array(r.json()["scores"])
    assert scores.shape == (4, 4)
    np.testing.assert_allclose(scores, scores.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(scores), 1.0, atol=1e-5)
    vectors = unit(ref.embed(images))
    np.testing.assert_allclose(scores, vectors @ vectors.T, atol=1e-5)


def test_similarity_of_a_with_b_has_shape_len_a_by_len_b(server, ref):
    a, b = [png_bytes(i) for i in range(3)], [png_bytes(i) for i in range(10, 15)]
    r = server.http.post("/similarity", json={"a": [b64(i) for i in a], "b": [b64(i) for i in b]})
    scores = np.array(r.json()["scores"])
    assert scores.shape == (3, 5)
    np.testing.assert_allclose(scores, unit(ref.embed(a)) @ unit(ref.embed(b)).T, atol=1e-5)
    r = server.http.post("/similarity", files=[("a", x) for x in a] + [("b", x) for x in b])
    np.testing.assert_allclose(np.array(r.json()["scores"]), scores, atol=1e-6)


# --- /reconstruct ----------------------------------------------------------------------------
def test_reconstruct_renders_the_mask_the_masked_input_and_the_backends_output(server, ref):
    card, image = ref.model.card, png_bytes(11, (70, 50))
    r = server.http.post("/reconstruct", json={"image": b64(image), "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    mask = np.array(body["mask"], np.uint8)
    s, p, mp = card["image_size"], card["patch_size"], card["mask_patch_size"]
    cells = (s // mp) ** 2
    assert mask.shape == (s // p, s // p)
    assert mask.sum() == math.ceil(card["mask_ratio"] * cells) * (mp // p) ** 2

    pixels = ref.pixels([image])[0]  # the dummy's reconstruction is its input: no loss
    assert body["loss"] == 0
    for key, want in (
        ("reconstruction", pixels),
        ("masked_input", pixels * (1 - np.kron(mask, np.ones((p, p))))[None]),
    ):
        picture = Image.open(io.BytesIO(base64.b64decode(body[key])))
        assert picture.format == "PNG" and picture.size == (s, s)
        assert picture.mode == ref.spec.color_mode
        diff = np.abs(np.asarray(picture, np.int16) - denormalize(want, ref.spec).astype(np.int16))
        assert diff.max() <= 1, key


def test_reconstruct_mask_follows_seed_and_mask_ratio(server, ref):
    image = b64(png_bytes(12))

    def mask(**options):
        return np.array(
            server.http.post("/reconstruct", json={"image": image, **options}).json()["mask"]
        )

    np.testing.assert_array_equal(mask(seed=5), mask(seed=5))
    assert not np.array_equal(mask(seed=5), mask(seed=6))
    card = ref.model.card
    per_cell = (card["mask_patch_size"] // card["patch_size"]) ** 2
    cells = (card["image_size"] // card["mask_patch_size"]) ** 2
    assert mask(seed=1, mask_ratio=0.25).sum() == math.ceil(0.25 * cells) * per_cell
    assert mask(seed=1, mask_ratio=1.0).all()


def test_reconstruct_with_accept_png_returns_original_masked_reconstruction_side_by_side(
    server, ref
):
    image = png_bytes(13)
    r = server.http.post(
        "/reconstruct",
        files={"image": ("x.png", image, "image/png")},
        data={"seed": "2"},
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(r.content))
    s = ref.model.card["image_size"]
    k = math.ceil(PANEL_MIN / s)
    assert picture.size == (3 * s * k + 2 * GAP, s * k)
    assert picture.mode == ref.spec.color_mode
    original = np.asarray(picture)[::k, : s * k : k]  # left panel, scaled back
    np.testing.assert_array_equal(original, denormalize(ref.pixels([image])[0], ref.spec))
    json_r = server.http.post(
        "/reconstruct",
        files={"image": ("x.png", image, "image/png")},
        data={"seed": "2"},
        headers={"Accept": "application/json"},
    )
    assert json_r.headers["content-type"] == "application/json"


# --- bad inputs: each gets its own status and code, and the server keeps serving ------------
def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG whose header claims width x height (the pixel data is for 1 x 1)."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


GOOD = b64(png_bytes(0))
BAD_REQUESTS = {  # name: (path, httpx keyword arguments, status, code, index)
    "undecodable-bytes": (
        "/embed",
        {"json": {"images": [GOOD, GOOD, b64(b"not an image")]}},
        400,
        "invalid_image",
        2,
    ),
    "truncated-png": (
        "/embed",
        {"json": {"images": [b64(png_bytes(1)[:60])]}},
        400,
        "invalid_image",
        0,
    ),
    "invalid-base64": (
        "/embed",
        {"json": {"images": [GOOD, "@@@not base64@@@"]}},
        400,
        "invalid_image",
        1,
    ),
    "url-not-fetched": (
        "/embed",
        {"json": {"images": ["https://example.com/cat.png"]}},
        400,
        "invalid_image",
        0,
    ),
    "undecodable-file": (
        "/embed",
        {"files": [("images", b"GIF89a garbage")]},
        400,
        "invalid_image",
        0,
    ),
    "bad-image-in-b": (
        "/similarity",
        {"json": {"a": [GOOD], "b": [GOOD, b64(b"x")]}},
        400,
        "invalid_image",
        1,
    ),
    "too-many-images": ("/embed", {"json": {"images": [GOOD] * 9}}, 413, "too_many_images", None),
    "too-many-images-a-plus-b": (
        "/similarity",
        {"json": {"a": [GOOD] * 5, "b": [GOOD] * 4}},
        413,
        "too_many_images",
        None,
    ),
    "too-many-pixels": (
        "/embed",
        {"json": {"images": [GOOD, b64(encode(Image.new("RGB", (1200, 1000))))]}},
        413,
        "image_too_large",
        1,
    ),
    "decompression-bomb": (
        "/embed",
        {"json": {"images": [b64(_bomb_png(100_000, 100_000))]}},
        413,
        "image_too_large",
        0,
    ),
    "body-too-large-chunked": (
        "/embed",
        {
            "content": [b'{"images": ["' + b"A" * 1_000_000, b"A" * 600_000 + b'"]}'],
            "headers": {"Content-Type": "application/json"},
        },
        413,
        "payload_too_large",
        None,
    ),
    "over-the-decode-budget": (
        "/embed",
        {"json": {"images": [GOOD, b64(encode(Image.new("L", (800, 800))))]}},
        413,
        "image_too_large",
        1,
    ),
    "many-unknown-keys": (
        "/embed",
        {"json": {f"key{i}": 0 for i in range(100_000)}},
        422,
        "invalid_request",
        None,
    ),
    "a-long-unknown-key": (
        "/embed",
        {"json": {"images": [GOOD], "k" * 1_000_000: 0}},
        422,
        "invalid_request",
        None,
    ),
    "a-million-item-list": (
        "/embed",
        {
            "content": b"[" + b"0," * 700_000 + b"0]",
            "headers": {"Content-Type": "application/json"},
        },
        422,
        "invalid_request",
        None,
    ),
    "text-plain": (
        "/embed",
        {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
        None,
    ),
    "no-content-type": ("/embed", {"content": b"{}"}, 415, "unsupported_media_type", None),
    "malformed-json": (
        "/embed",
        {"content": b'{"images": [', "headers": {"Content-Type": "application/json"}},
        422,
        "invalid_request",
        None,
    ),
    "images-not-a-list": ("/embed", {"json": {"images": GOOD}}, 422, "invalid_request", None),
    "no-images": ("/embed", {"json": {"images": []}}, 422, "invalid_request", None),
    "unknown-field": (
        "/embed",
        {"json": {"images": [GOOD], "normalise": True}},
        422,
        "invalid_request",
        None,
    ),
    "unknown-encoding": (
        "/embed",
        {"json": {"images": [GOOD], "encoding": "hex"}},
        422,
        "invalid_request",
        None,
    ),
    "mask-ratio-over-1": (
        "/reconstruct",
        {"json": {"image": GOOD, "mask_ratio": 1.5}},
        422,
        "invalid_request",
        None,
    ),
    "two-images-to-reconstruct": (
        "/reconstruct",
        {"files": [("image", b"a"), ("image", b"b")]},
        422,
        "invalid_request",
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_each_bad_input_gets_its_status_and_code_and_the_server_keeps_serving(server, ref, case):
    path, kwargs, status, code, index = BAD_REQUESTS[case]
    r = server.http.post(path, **kwargs)
    assert r.status_code == status, r.text[:2000]
    assert len(r.content) <= 2048  # nothing sent comes back at length
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    assert error.get("index") == index
    assert_serving(server, ref)


def test_content_length_over_the_limit_gets_413_before_the_body_is_read(server):
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(
            b"POST /embed HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 999999999\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\n\r\n"
        )
        stream = conn.makefile("rb")
        status = stream.readline()
        headers = dict(
            line.decode().strip().lower().split(": ", 1) for line in iter(stream.readline, b"\r\n")
        )
        body = json.loads(stream.read(int(headers["content-length"])))
    assert status.startswith(b"HTTP/1.1 413")
    assert body["error"]["code"] == "payload_too_large"


def test_wrong_method_gets_405_in_the_error_format(server):
    r = server.http.get("/embed")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_bad_requests_do_not_disturb_concurrent_good_ones(server, ref):
    good = [png_bytes(i) for i in range(20, 26)]
    expected = ref.embed(good)
    bad = [
        "undecodable-bytes",
        "too-many-images",
        "malformed-json",
        "decompression-bomb",
        "invalid-base64",
        "text-plain",
    ]

    def send(job):
        kind, value = job
        if kind == "good":
            return embed(server, [good[value]], normalize=False)[0]
        path, kwargs, *_ = BAD_REQUESTS[value]
        return server.http.post(path, **kwargs).status_code

    jobs = [
        job
        for pair in zip([("good", i) for i in range(6)], [("bad", b) for b in bad])
        for job in pair
    ]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, jobs))
    np.testing.assert_allclose(np.stack(results[0::2]), expected, atol=1e-5, rtol=0)
    assert results[1::2] == [BAD_REQUESTS[b][2] for b in bad]
