"""Issue 13's list of inputs that used to get a 500 (or a dropped connection), each sent
for real to gunicorn: every one must end in a typed 4xx, or a 200 where it is valid."""

from __future__ import annotations

import gzip
import io
import json
import struct
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import png_chunk, rss_mb, start_server, stop_server
from tests.restyle import canvas_seven, encode, ink_on_paper

V2_INFER = "/v2/models/mnist_cnn/infer"
V1_PREDICT = "/v1/models/mnist_cnn:predict"


@pytest.fixture(scope="module")
def server(fit_run, tmp_path_factory):
    """One worker, so that metrics, logs and memory are this module's alone."""
    running = start_server(fit_run.models_dir,
                           tmp_path_factory.mktemp("bad_input") / "gunicorn.log", WORKERS="1")
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


@pytest.fixture(scope="module")
def seven(mnist) -> Image.Image:
    assert mnist.y_test[0] == 7
    return ink_on_paper(mnist.x_test[0], np.random.default_rng(0)).convert("L")


def error_of(response, status: int) -> str:
    """The error message, after checking the status and that the body is our JSON."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    return error if isinstance(error, str) else error["code"] + ": " + error["message"]


def v2_json(tensor: dict, url: str, **kw) -> requests.Response:
    return requests.post(url + V2_INFER, json={"inputs": [{"name": "image", **tensor}]},
                         timeout=30, **kw)


@pytest.mark.parametrize("path", ["/predict", V1_PREDICT])
def test_a_named_instance_holding_an_empty_object_is_400(url, path):
    response = requests.post(url + path, json={"instances": [{"image": {}}]}, timeout=30)
    assert "b64" in error_of(response, 400)


@pytest.mark.parametrize("path", ["/predict", V1_PREDICT])
def test_b64_that_is_not_a_string_is_400(url, path):
    response = requests.post(url + path, json={"instances": [{"b64": 7}]}, timeout=30)
    assert "b64" in error_of(response, 400)


@pytest.mark.parametrize("value", ["²", "¹²", "9" * 5000, "-1", "1e3"])
def test_a_header_length_that_is_not_ascii_digits_is_400(url, value):
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 784], "datatype": "FP32",
                                   "data": [0.0] * 784}]}).encode()
    response = requests.post(url + V2_INFER, data=body, timeout=30,
                             headers={"Inference-Header-Content-Length": value})
    assert "Inference-Header-Content-Length" in error_of(response, 400)


@pytest.mark.parametrize("shape", [[2 ** 63 - 1], [2 ** 63 - 1, 0], [1, 2 ** 40, 784],
                                   [257, 784], [1, 1, 1, 1, 28, 28]])
def test_a_tensor_shape_over_max_batch_values_is_413(url, shape):
    response = v2_json({"shape": shape, "datatype": "FP32", "data": []}, url)
    assert "MAX_BATCH" in error_of(response, 413)


@pytest.mark.parametrize(("data", "datatype"), [(["0.5"] * 784, "FP32"),
                                                ([True] * 784, "FP32"),
                                                ([300] * 784, "UINT8"),
                                                ([-1] * 784, "UINT8"),
                                                ([0.5] * 784, "UINT8")])
def test_v2_json_data_that_is_not_numbers_of_its_datatype_is_400(url, data, datatype):
    response = v2_json({"shape": [1, 784], "datatype": datatype, "data": data}, url)
    assert f"{datatype} numbers" in error_of(response, 400)


def npy_with_header(shape: tuple, descr: str = "<f4", data: bytes = b"") -> bytes:
    """An .npy file whose header says ``shape`` whatever data follows it."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data


def post_npy(url: str, body: bytes) -> requests.Response:
    return requests.post(url + "/predict", data=body, timeout=30,
                         headers={"Content-Type": "application/x-npy"})


def test_an_npy_header_declaring_a_huge_shape_is_413_before_allocating(url):
    # NumPy itself would try to allocate 3 TB here (MemoryError, a 500 before).
    body = npy_with_header((10 ** 12, 28, 28), data=b"\0" * 64)
    assert "MAX_BATCH" in error_of(post_npy(url, body), 413)


def test_an_npy_body_shorter_than_its_header_declares_is_400(url):
    body = npy_with_header((2, 28, 28), data=b"\0" * (28 * 28 * 4))
    assert "declares 6272 bytes" in error_of(post_npy(url, body), 400)


def test_an_npy_with_a_structured_dtype_is_422(url):
    body = npy_with_header((1,), descr="|V8", data=b"\0" * 8)
    assert "numbers" in error_of(post_npy(url, body), 422)


def npy_with_raw_header(header: str) -> bytes:
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin-1")


@pytest.mark.parametrize("header", [
    # found by make fuzz: NumPy's header tokenizer raises TokenError, not a SyntaxError
    "{'descr': '|u1', 'fortran_order': False, 'shape': (4, \x93NUMPY\x00\n",
    "{'dewcrdewcrdewcrde\n",
    "{'descr': '|u1', 'fortran_order': False, 'shape': " + "(" * 300 + "\n",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (4, 28, 28), 'x': 1e999999}\n",
])
def test_an_npy_header_that_is_not_a_python_literal_is_400(url, header):
    assert "not a readable .npy array" in error_of(post_npy(url, npy_with_raw_header(header)),
                                                   400)


@pytest.mark.parametrize("shape, data_bytes", [
    # found by a helper's attack: their products pass the size checks, reshape then fails
    ((-1, -28, 28), 784), ((-1, 0, 28), 0), ((True, 28, 28), 784), ((False, 28, 28), 0),
])
def test_an_npy_shape_with_negative_or_boolean_sizes_is_400(url, shape, data_bytes):
    body = npy_with_header(shape, descr="|u1", data=b"\0" * data_bytes)
    assert "is not a tuple of sizes" in error_of(post_npy(url, body), 400)


def test_a_fortran_order_npy_is_read_as_numpy_reads_it(url, mnist):
    digits = np.asfortranarray(mnist.x_test[:3])
    buffer = io.BytesIO()
    np.save(buffer, digits)
    response = post_npy(url, buffer.getvalue())
    assert response.status_code == 200, response.text
    direct = post_npy(url, npy_bytes(np.ascontiguousarray(digits))).json()
    assert response.json()["predictions"] == direct["predictions"]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_a_cielab_tiff_is_read_by_its_lightness(url, seven):
    lab = Image.merge("LAB", (seven, Image.new("L", seven.size, 128),
                              Image.new("L", seven.size, 128)))
    response = requests.post(url + "/predict", data=encode(lab, "TIFF"), timeout=30,
                             headers={"Content-Type": "image/tiff"})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["digit"] == 7


def ico_wrapping_png(side: int) -> bytes:
    """An ICO whose directory says 256×256 but whose one entry is a side×side PNG."""
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(b"\0" * (side + 1)) for _ in range(side))
    png = (b"\x89PNG\r\n\x1a\n"
           + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
           + png_chunk(b"IDAT", idat + compressor.flush()) + png_chunk(b"IEND", b""))
    directory = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + directory + png


def fits_file() -> bytes:
    """A minimal 28×28 8-bit FITS image, a format Pillow reads but the README does not list."""
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8",
             "NAXIS   =                    2", "NAXIS1  =                   28",
             "NAXIS2  =                   28", "END"]
    header = "".join(card.ljust(80) for card in cards).ljust(2880).encode()
    return header + bytes(range(256))[:28] * 28 + b"\0" * (2880 - 784)


@pytest.mark.parametrize("make", [lambda: ico_wrapping_png(3000), fits_file],
                         ids=["ico-wrapping-a-large-png", "fits"])
def test_formats_pillow_reads_but_the_readme_does_not_list_are_400(url, make):
    data = make()
    with warnings.catch_warnings():  # the ICO's lie about its size makes Pillow warn
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as image:  # Pillow, left to itself, opens it
            assert image.format in {"ICO", "FITS"}
    response = requests.post(url + "/predict", data=data, timeout=30,
                             headers={"Content-Type": "image/png"})
    assert "not a readable image" in error_of(response, 400)


def test_an_image_just_over_max_image_pixels_is_422_from_our_check(url):
    # 6400² = 40,960,000: over our 40,000,000 yet under Pillow's own bomb limit (89 M
    # warns, 179 M raises), so only our check can refuse it; it names the numbers.
    big = encode(Image.new("L", (6400, 6400), 255), "PNG")
    response = requests.post(url + "/predict", data=big, timeout=60,
                             headers={"Content-Type": "image/png"})
    assert "6400×6400 = 40,960,000 pixels, the limit is 40,000,000" in error_of(response, 422)


def peak_growth_mb(server, send) -> float:
    """How far ``send()`` raises the worker's peak resident memory above where it was:
    the peak (VmHWM) is reset to the current size first (``clear_refs``, Linux 4.0+)."""
    (worker,) = server.worker_pids()
    Path(f"/proc/{worker}/clear_refs").write_text("5")
    before = rss_mb([worker])[worker]
    send()
    return rss_mb([worker], "VmHWM")[worker] - before


def test_a_jpeg_photo_is_reduced_while_decoding(server, seven):
    """A 5000×5000 JPEG is decoded at 1/8 scale (625×625, 1.1 MB as RGB), never whole
    (75 MB as RGB), and still gives its digit."""
    photo = seven.convert("RGB").resize((5000, 5000), Image.Resampling.BILINEAR)
    body = encode(photo, "JPEG", quality=90)
    small = encode(seven.convert("RGB").resize((600, 600)), "JPEG", quality=90)

    def post(data: bytes) -> requests.Response:
        return requests.post(server.url + "/predict", data=data, timeout=60,
                             headers={"Content-Type": "image/jpeg"})

    post(small)  # the JPEG path's first use (imports, buffers) is not what is measured
    responses = []
    growth = peak_growth_mb(server, lambda: responses.append(post(body)))
    assert responses[0].status_code == 200, responses[0].text
    assert responses[0].json()["predictions"][0]["digit"] == 7
    assert growth < 25, f"decoding the photo raised the worker's peak by {growth:.0f} MB"


def post_gzip(url: str, body: bytes) -> requests.Response:
    return requests.post(url + "/predict", data=body, timeout=30, headers={
        "Content-Type": "image/png", "Content-Encoding": "gzip"})


def test_a_multi_member_gzip_body_is_read_whole(url, seven):
    png = encode(seven, "PNG")
    response = post_gzip(url, gzip.compress(png[:100]) + gzip.compress(png[100:]))
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["digit"] == 7


@pytest.mark.parametrize("tail", [b"junk", b"\0" * 8, b"\x1f"])
def test_bytes_after_the_gzip_data_are_400(url, seven, tail):
    response = post_gzip(url, gzip.compress(encode(seven, "PNG")) + tail)
    assert "follow the end" in error_of(response, 400) or "truncated" in response.text


def test_an_11_mb_body_reaches_urllib_as_a_413(url):
    request = urllib.request.Request(url + "/predict", data=b"\0" * (11 * 1024 * 1024),
                                     headers={"Content-Type": "image/png"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 413
    assert json.loads(caught.value.read())["error"]["code"] == "payload_too_large"


def test_invented_methods_are_counted_as_other(url):
    for index in range(30):
        requests.request(f"INVENTED{index}", url + "/predict", timeout=10)
    text = requests.get(url + "/metrics", timeout=10).text
    assert "INVENTED" not in text
    line, = [line for line in text.splitlines() if line.startswith(
        'http_requests_total{endpoint="unmatched",method="other",status="405"}')]
    assert float(line.split()[-1]) == 30


def test_a_large_transparent_canvas_png_still_gives_its_digit(url):
    # 3000² RGBA goes through shrink()'s strips; the answer must be the drawn 7.
    response = requests.post(url + "/predict", data=encode(canvas_seven(3000), "PNG"),
                             timeout=60, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["digit"] == 7


@pytest.mark.parametrize("path", ["/predict", V1_PREDICT])
@pytest.mark.parametrize("pixel", [True, False, "0.5", None])
def test_a_pixel_that_is_not_a_json_number_is_400_as_on_v2(url, path, pixel):
    """NumPy reads true and "0.5" as 1.0 and 0.5; pixels are numbers on every protocol."""
    digit = [[0.0] * 28 for _ in range(28)]
    digit[3][5] = pixel
    response = requests.post(url + path, json={"instances": [digit]}, timeout=30)
    assert "pixels must be JSON numbers" in error_of(response, 400)


def multipart_fields(count: int, size: int) -> tuple[bytes, str]:
    """A multipart body of ``count`` text fields of ``size`` bytes each, and no file."""
    parts = [b'--b0und\r\nContent-Disposition: form-data; name="f%d"\r\n\r\n%s\r\n'
             % (index, b"v" * size) for index in range(count)]
    return b"".join(parts) + b"--b0und--\r\n", "multipart/form-data; boundary=b0und"


@pytest.mark.parametrize(("count", "size"), [(1001, 1), (1, 600_000)])
def test_a_gzip_multipart_body_has_the_same_form_limits_as_a_plain_one(url, count, size):
    """MAX_FORM_PARTS and MAX_FORM_MEMORY_SIZE hold whether or not the body is gzip
    (a compressed body used to be parsed without them: 400 "no file parts")."""
    body, content_type = multipart_fields(count, size)
    plain = requests.post(url + "/predict", data=body, timeout=30,
                          headers={"Content-Type": content_type})
    packed = requests.post(url + "/predict", data=gzip.compress(body), timeout=30,
                           headers={"Content-Type": content_type, "Content-Encoding": "gzip"})
    assert "more than 1,000 parts" in error_of(packed, 413)
    assert error_of(plain, 413) == error_of(packed, 413)


@pytest.fixture(scope="module")
def lone_worker(fit_run, tmp_path_factory):
    """A server of its own, whose one worker's peak memory is only what this test sends."""
    running = start_server(fit_run.models_dir,
                           tmp_path_factory.mktemp("lone_worker") / "gunicorn.log",
                           WORKERS="1")
    yield running
    stop_server(running)


def tiny_instances(path: str, count: int) -> bytes:
    """Close to 10 MB (MAX_CONTENT_LENGTH) of empty instances: 3.3 million of them parse
    to 230 MB of Python lists, from 10 MB."""
    items = b",".join([b"[]"] * count)
    if path == V2_INFER:
        return (b'{"inputs": [{"name": "image", "shape": [1, 784], "datatype": "FP32", '
                b'"data": [' + items + b"]}]}")
    return b'{"instances": [' + items + b"]}"


def test_a_json_body_of_millions_of_tiny_instances_is_refused_before_it_is_parsed(
        lone_worker):
    url = lone_worker.url
    warm = requests.post(url + "/predict", json={"instances": [[[0.0] * 28] * 28]}, timeout=30)
    assert warm.status_code == 200, warm.text
    (before,) = lone_worker.worker_rss_mb("VmHWM").values()
    responses = [requests.post(url + path, data=tiny_instances(path, 3_300_000), timeout=60,
                               headers={"Content-Type": "application/json"})
                 for path in ("/predict", V1_PREDICT, V2_INFER)]
    (after,) = lone_worker.worker_rss_mb("VmHWM").values()
    assert after - before < 60, f"the worker's peak grew {after - before:.0f} MB"
    for response in responses:
        assert "counted before parsing" in error_of(response, 413)
