"""Every limit and bad input is a 4xx with a message, on a real uvicorn process (limits in conftest.LIMITS)."""

from __future__ import annotations

import io
import select
import socket
import struct
import time
import zlib
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from PIL import Image

MAX_BODY = 1 << 20  # conftest.LIMITS


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with only a few rows of data (decoding it would fail)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _upload(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/predict", files=[("files", (name, data, "application/octet-stream"))])


def _read_status(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    return data


def _connect(server) -> socket.socket:
    url = urlparse(server.url)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def test_body_over_the_limit_is_413_from_content_length_before_any_body(server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 10000000000\r\n\r\n")
        head = _read_status(sock)  # not a byte of the 10 GB was sent
    assert head.startswith(b"HTTP/1.1 413"), head[:200]


def test_body_over_the_limit_is_413_while_it_streams(server) -> None:
    """Chunked, no length: the server answers 413 once it has seen the limit, without waiting for the end."""
    with _connect(server) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=x\r\nTransfer-Encoding: chunked\r\n\r\n")
        part_head = b'--x\r\nContent-Disposition: form-data; name="files"; filename="endless.png"\r\nContent-Type: image/png\r\n\r\n'
        piece = b"z" * (16 * 1024)
        sent, head = 0, b""
        while sent < 4 * MAX_BODY:  # far more than the limit; the body never ends
            data = part_head + piece if sent == 0 else piece
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            sent += len(data)
            if select.select([sock], [], [], 0.01)[0]:
                head = _read_status(sock)
                break
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert MAX_BODY < sent < 2 * MAX_BODY  # answered soon after the limit, not at the end


def test_body_over_the_limit_is_413_for_an_ordinary_client(client: httpx.Client) -> None:
    response = client.post("/predict", files=[("files", ("big.png", b"\x00" * (MAX_BODY + 1000), "image/png"))])
    assert response.status_code == 413
    assert "limit" in response.json()["error"]


@pytest.mark.reliability("server: decompression bomb upload 413 before decoding")
def test_decompression_bomb_is_413_before_decoding(client: httpx.Client) -> None:
    # 25 megapixels declared in a few hundred bytes: the header check refuses it (decoding would fail as truncated).
    small = _png_header(5000, 5000)
    assert len(small) < 2000
    response = _upload(client, "bomb.png", small)
    assert response.status_code == 413, response.text
    assert "bomb.png" in response.json()["error"] and "pixels" in response.json()["error"]
    # Past Pillow's own bomb threshold too (900 megapixels).
    huge = _upload(client, "huge.png", _png_header(30000, 30000))
    assert huge.status_code == 413 and "huge.png" in huge.json()["error"]


def test_an_extreme_aspect_ratio_cannot_blow_up_the_resize(client: httpx.Client) -> None:
    # 1 x 200,000 is within the pixel limit, but resizing its shorter side to 32 would make 204.8 megapixels.
    buf = io.BytesIO()
    Image.new("L", (1, 200_000)).save(buf, format="PNG")
    response = _upload(client, "strip.png", buf.getvalue())
    assert response.status_code == 413, response.text
    assert "'strip.png'" in response.json()["error"] and "resized" in response.json()["error"]


@pytest.mark.reliability("server: decompression bomb upload 413 before decoding")
def test_a_real_compressed_bomb_is_413(client: httpx.Client) -> None:
    buf = io.BytesIO()
    Image.new("L", (2000, 1000)).save(buf, format="PNG", optimize=True)  # 2 MP of zeros in a few kB
    assert len(buf.getvalue()) < 50_000
    response = _upload(client, "zeros.png", buf.getvalue())
    assert response.status_code == 413 and "zeros.png" in response.json()["error"]


def test_too_many_files_is_413(client: httpx.Client, digit_files: list[Path]) -> None:
    files = [("files", (f"{i}.png", digit_files[0].read_bytes(), "image/png")) for i in range(9)]
    response = client.post("/predict", files=files)
    assert response.status_code == 413 and "at most 8" in response.json()["error"]


def test_too_many_instances_is_413(client: httpx.Client) -> None:
    response = client.post("/predict", json={"instances": ["aGk="] * 9})
    assert response.status_code == 413 and "at most 8" in response.json()["error"]


@pytest.mark.reliability("server: corrupt or non-image upload 415/422 naming the file")
@pytest.mark.parametrize(
    ("name", "data", "status"),
    [
        ("notes.txt", b"this is not an image at all", 415),
        ("truncated.png", None, 422),  # a real PNG cut in half
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50, 422),
        ("empty.png", b"", 422),
    ],
)
def test_non_image_or_corrupt_upload_names_the_file(client: httpx.Client, digit_files: list[Path], name: str, data: bytes | None, status: int) -> None:
    if data is None:
        raw = digit_files[0].read_bytes()
        data = raw[: len(raw) // 2]
    response = _upload(client, name, data)
    assert response.status_code == status, response.text
    assert f"'{name}'" in response.json()["error"]


@pytest.mark.reliability("server: corrupt or non-image upload 415/422 naming the file")
def test_one_bad_file_among_good_ones_is_named(client: httpx.Client, digit_files: list[Path]) -> None:
    files = [("files", ("good.png", digit_files[0].read_bytes(), "image/png")), ("files", ("bad.gif", b"GIF89a-nope", "image/gif"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 415 and "'bad.gif'" in response.json()["error"]


def test_bad_json_bodies(client: httpx.Client) -> None:
    malformed = client.post("/predict", content=b'{"instances": [', headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]
    assert client.post("/predict", json={"images": []}).status_code == 422
    assert client.post("/predict", json={"instances": []}).status_code == 422
    bad64 = client.post("/predict", json={"instances": ["not base64!!"]})
    assert bad64.status_code == 422 and "instances[0]" in bad64.json()["error"]
    not_image = client.post("/predict", json={"instances": ["aGVsbG8="]})
    assert not_image.status_code == 415 and "instances[0]" in not_image.json()["error"]


def test_other_bad_requests(client: httpx.Client, digit_files: list[Path]) -> None:
    assert client.post("/predict", content=b"raw", headers={"Content-Type": "text/plain"}).status_code == 415
    no_files = client.post("/predict", content=b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv\r\n--b--\r\n",
                           headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert no_files.status_code == 422 and "files" in no_files.json()["error"]
    no_boundary = client.post("/predict", content=b"x", headers={"Content-Type": "multipart/form-data"})
    assert no_boundary.status_code == 400
    top_k = client.post("/predict", params={"top_k": 0}, files=[("files", ("a.png", digit_files[0].read_bytes(), "image/png"))])
    assert top_k.status_code == 422 and "error" in top_k.json()
    assert client.get("/predict").status_code == 405
    assert client.get("/nope").json() == {"error": "Not Found"}


def test_limits_do_not_slow_normal_requests(client: httpx.Client, digit_files: list[Path]) -> None:
    start = time.perf_counter()
    response = _upload(client, "ok.png", digit_files[0].read_bytes())
    assert response.status_code == 200 and time.perf_counter() - start < 5
