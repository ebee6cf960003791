"""Cropped JPEG decode: data/_jpeg_crop.c (libjpeg-turbo jpeg_crop_scanline + jpeg_skip_scanlines)
and images.decode_crop.

The oracle is a full decode at the same scale, sliced. Tolerance: none. The extension is checked
bit-for-bit against its own full-image decode (same library, same settings), and against
simplejpeg's full decode: that is libjpeg-turbo too (3.1.2 bundled vs the system's 2.1.5 here),
and islow/ifast IDCT, fancy/merged upsampling and colour conversion are the same integer code in
both (their SIMD versions are bit-exact with C), so the max abs difference is 0 - including
fast=True (ifast + merged upsampling). images.decode_crop must equal decode_scaled + slice
exactly, whichever path it takes.
"""

import io
import math
import os
import threading

import cv2
import numpy as np
import psutil
import pytest
import simplejpeg
from PIL import Image

from data import images

try:
    from data import _jpeg_crop
except ImportError:
    _jpeg_crop = None

HAS_HEADERS = os.path.exists("/usr/include/jpeglib.h")


@pytest.fixture
def jc():
    """The extension; missing is a failure where it can be built (a broken build must not
    silently fall back), a skip elsewhere."""
    if _jpeg_crop is None:
        if HAS_HEADERS:
            pytest.fail(
                "/usr/include/jpeglib.h exists but data._jpeg_crop is not built: "
                "reinstall (make venv / pip install -e .) and read the compiler output"
            )
        pytest.skip("no libjpeg headers: data._jpeg_crop is not built here")
    return _jpeg_crop


def _digits(height, width):
    """Three sklearn digits (8x8) upscaled into the R, G and B channels."""
    from sklearn.datasets import load_digits

    d = load_digits().images[:3]  # values 0..16
    chans = [
        cv2.resize((d[i] * 15).astype(np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
        for i in range(3)
    ]
    return np.ascontiguousarray(np.stack(chans, -1))


def _photo(height, width, seed=0):
    """Photo-like: smooth sinusoid shading, a few hard-edged ellipses, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fy, fx, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
        img[..., c] = 128 + 90 * np.sin(fy * yy + fx * xx + phase)
    for _ in range(5):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(5, width // 3)), int(rng.integers(5, height // 3)))
        cv2.ellipse(
            img,
            centre,
            axes,
            float(rng.uniform(0, 180)),
            0,
            360,
            rng.uniform(0, 255, 3).tolist(),
            -1,
        )
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(img, subsampling):
    if subsampling == "gray":
        gray = np.ascontiguousarray(img[..., 1:2])
        return simplejpeg.encode_jpeg(gray, 95, colorspace="GRAY", colorsubsampling="Gray")
    return simplejpeg.encode_jpeg(img, 95, colorspace="RGB", colorsubsampling=subsampling)


def _pillow(img, **kwargs):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


def _jpegs():
    """name -> JPEG bytes: 3 images x {4:2:0, 4:4:4, 4:2:2, gray} at q95, plus progressive."""
    out = {}
    for name, img in [
        ("digits", _digits(120, 96)),
        ("photo224", _photo(224, 224)),
        ("photo173x251", _photo(173, 251, seed=1)),
    ]:
        for sub in ("420", "444", "422", "gray"):
            out[f"{name}-{sub}"] = _encode(img, sub)
    out["photo224-progressive"] = _pillow(_photo(224, 224, seed=2), progressive=True)
    out["photo173x251-progressive444"] = _pillow(
        _photo(173, 251, seed=3), progressive=True, subsampling=0
    )
    return out


JPEGS = _jpegs()


def _random_boxes(rng, height, width, n):
    """n random boxes plus the awkward ones: corners, 1-pixel, full rows/columns, whole image."""
    boxes = [
        (0, 0, height, width),
        (0, 0, 1, 1),
        (height - 1, width - 1, 1, 1),
        (0, width - 1, height, 1),
        (height - 1, 0, 1, width),
        (height // 2, 16 % width, 1, 1),
    ]
    for _ in range(n):
        y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
        boxes.append(
            (y, x, int(rng.integers(1, height - y + 1)), int(rng.integers(1, width - x + 1)))
        )
    return boxes


def _ext(jc, data, box, k, fast):
    y, x, h, w = box
    return np.frombuffer(jc.decode_crop(data, y, x, h, w, k, fast), np.uint8).reshape(h, w, 3)


def _oracle(data, box, min_height, min_width, fast):
    """decode_scaled + the loader's source->scaled box mapping, written out independently."""
    full = images.decode_scaled(data, min_height, min_width, fast=fast)
    height, width = images.image_size(data)
    y, x, h, w = box
    sy, sx = full.shape[0] / height, full.shape[1] / width
    y0, x0 = int(y * sy), int(x * sx)
    y1 = max(y0 + 1, min(full.shape[0], int(round((y + h) * sy))))
    x1 = max(x0 + 1, min(full.shape[1], int(round((x + w) * sx))))
    return full[y0:y1, x0:x1]


def test_extension_is_built_where_libjpeg_headers_exist():
    if not HAS_HEADERS:
        pytest.skip("no /usr/include/jpeglib.h")
    assert _jpeg_crop is not None, "libjpeg headers present but data._jpeg_crop failed to build"
    assert images.HAS_CROPPED_DECODE
    assert _jpeg_crop.LIBJPEG_TURBO_VERSION_NUMBER >= 2000000  # crop/skip API: >= 1.5, fixes 2.0.x


@pytest.mark.parametrize("name", sorted(JPEGS))
def test_extension_crop_is_bit_identical_to_its_full_decode(jc, name):
    data = JPEGS[name]
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    rng = np.random.default_rng(len(name))
    for k in range(1, 9):
        oh, ow = math.ceil(height * k / 8), math.ceil(width * k / 8)
        for fast in (False, True):
            full = _ext(jc, data, (0, 0, oh, ow), k, fast)
            for y, x, h, w in _random_boxes(rng, oh, ow, 25):
                crop = _ext(jc, data, (y, x, h, w), k, fast)
                np.testing.assert_array_equal(
                    crop,
                    full[y : y + h, x : x + w],
                    err_msg=f"{name} k={k} fast={fast} box={(y, x, h, w)}",
                )


@pytest.mark.parametrize("name", sorted(JPEGS))
def test_extension_full_decode_equals_simplejpeg(jc, name):
    data = JPEGS[name]
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    for k in range(1, 9):
        oh, ow = math.ceil(height * k / 8), math.ceil(width * k / 8)
        for fast in (False, True):
            ref = simplejpeg.decode_jpeg(
                data, "RGB", fastdct=fast, fastupsample=fast, min_height=oh, min_width=ow
            )
            assert ref.shape == (oh, ow, 3)
            ours = _ext(jc, data, (0, 0, oh, ow), k, fast)
            diff = int(np.abs(ours.astype(np.int16) - ref).max())
            assert diff == 0, (
                f"{name} k={k} fast={fast}: max abs difference {diff} (see module doc)"
            )


@pytest.mark.parametrize("name", sorted(JPEGS))
def test_decode_crop_equals_oracle(name):
    data = JPEGS[name]
    height, width = images.image_size(data)
    rng = np.random.default_rng(7)
    for box in _random_boxes(rng, height, width, 30):
        _, _, h, w = box
        # the loader's minimums (output size s), none, and arbitrary ones
        s = int(rng.choice([16, 32, 64, 112, 224]))
        minimums = [
            (min(height, math.ceil(height * s / h)), min(width, math.ceil(width * s / w))),
            (0, 0),
            (int(rng.integers(-2, height + 3)), int(rng.integers(-2, width + 3))),
        ]
        for min_height, min_width in minimums:
            for fast in (False, True):
                got = images.decode_crop(data, box, min_height, min_width, fast=fast)
                want = _oracle(data, box, min_height, min_width, fast)
                assert got.dtype == np.uint8 and got.flags.c_contiguous
                np.testing.assert_array_equal(
                    got, want, err_msg=f"{name} box={box} min={min_height, min_width} fast={fast}"
                )


def test_scale_choice_matches_simplejpeg():
    """simplejpeg's output size: smallest k/8 meeting both minimums (<= 0 ignored) ..."""
    rng = np.random.default_rng(0)
    for height in (1, 2, 5, 7, 8, 9, 16, 23, 173):
        for width in (1, 3, 6, 8, 17, 251):
            data = _encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "420")
            for mh in (-1, 0, 1, 2, height // 3, height - 1, height, height + 1):
                for mw in (-1, 0, 1, width // 2, width - 1, width, width + 5):
                    k = images._jpeg_scale_num(height, width, mh, mw)
                    want = simplejpeg.decode_jpeg_header(data, mh, mw)[:2]
                    assert (math.ceil(height * k / 8), math.ceil(width * k / 8)) == want


def test_scale_choice_on_tiny_images_uses_the_largest_factor_of_that_size():
    """... decoded by tjDecompress2 with the largest factor of that size: for sides < 8 several
    k give the same size (5x5 at 7/8 and 8/8) but different IDCTs, so pixels tell them apart."""
    rng = np.random.default_rng(1)
    for height, width in [(1, 1), (3, 7), (5, 5), (7, 6), (2, 9), (9, 13)]:
        for sub in ("420", "444"):
            data = _encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), sub)
            for mh in range(0, height + 1):
                for mw in (0, width // 2, width):
                    for fast in (False, True):
                        box = (0, 0, height, width)
                        np.testing.assert_array_equal(
                            images.decode_crop(data, box, mh, mw, fast=fast),
                            images.decode_scaled(data, mh, mw, fast=fast),
                            err_msg=f"{height}x{width} {sub} min={mh, mw} fast={fast}",
                        )
    assert images._jpeg_scale_num(5, 5, 5, 5) == 8  # not 7, although 7/8 is 5x5 too


def test_fallback_path_gives_the_same_result(monkeypatch):
    data = JPEGS["photo173x251-420"]
    boxes = _random_boxes(np.random.default_rng(3), 173, 251, 20)
    with_ext = [images.decode_crop(data, b, 40, 40, fast=True) for b in boxes]
    monkeypatch.setattr(images, "HAS_CROPPED_DECODE", False)
    for box, want in zip(boxes, with_ext):
        np.testing.assert_array_equal(images.decode_crop(data, box, 40, 40, fast=True), want)


def test_png_goes_through_the_full_decode():
    img = _photo(90, 70)
    data = images.encode_png(img)
    box = (10, 5, 50, 41)
    np.testing.assert_array_equal(images.decode_crop(data, box, 20, 20), img[10:60, 5:46])


def test_cmyk_jpeg(jc):
    buf = io.BytesIO()
    Image.fromarray(_photo(64, 48)).convert("CMYK").save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    with pytest.raises(ValueError, match="CMYK JPEG"):
        jc.decode_crop(data, 0, 0, 8, 8)
    box = (3, 4, 30, 20)  # images.decode_crop hands CMYK to simplejpeg, which converts it
    np.testing.assert_array_equal(
        images.decode_crop(data, box, 16, 16), _oracle(data, box, 16, 16, False)
    )


def test_truncated_jpeg_decodes_with_a_warning_only(jc):
    data = JPEGS["photo224-420"][: len(JPEGS["photo224-420"]) // 2]
    out = _ext(jc, data, (150, 20, 60, 100), 8, False)  # rows past the cut: libjpeg's filler
    assert out.shape == (60, 100, 3)
    box = (100, 10, 110, 200)
    for fast in (False, True):
        np.testing.assert_array_equal(
            images.decode_crop(data, box, fast=fast), _oracle(data, box, 0, 0, fast)
        )


@pytest.mark.parametrize("fraction", [0.15, 0.5])
def test_truncated_progressive_crop_equals_its_full_decode(jc, fraction):
    """Incomplete progressive coefficients switch on libjpeg's interblock smoothing, which on
    2.1.5 changes pixels near the left edge of a horizontally cropped region; the extension then
    decodes whole rows (still skipping rows), so crops stay exact. Not compared with simplejpeg:
    its libjpeg-turbo 3.1.2 smooths truncated 4:2:0 progressive files differently from 2.1.5
    (max abs difference 13 at 15% of this file, 1 at 50%; complete files: 0)."""
    data = JPEGS["photo224-progressive"]
    data = data[: int(len(data) * fraction)]
    rng = np.random.default_rng(11)
    for k in (2, 5, 8):
        oh = ow = 28 * k
        for fast in (False, True):
            full = _ext(jc, data, (0, 0, oh, ow), k, fast)
            for y, x, h, w in _random_boxes(rng, oh, ow, 20):
                np.testing.assert_array_equal(
                    _ext(jc, data, (y, x, h, w), k, fast), full[y : y + h, x : x + w]
                )


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "Empty input"),
        (b"hello, world", "Not a JPEG file"),
        (b"\xff\xd8\xff\xe0" + bytes(200), ""),
        (b"\xff\xd8\xff" + np.random.default_rng(0).integers(0, 256, 2000, np.uint8).tobytes(), ""),
    ],
)
def test_garbage_raises_value_error_with_libjpeg_message(jc, data, message):
    with pytest.raises(ValueError, match=f"^decode_crop: .*{message}") as info:
        jc.decode_crop(data, 0, 0, 1, 1)
    assert len(str(info.value)) > len("decode_crop: ")


def test_bad_box_and_arguments(jc):
    data = JPEGS["photo173x251-420"]
    with pytest.raises(ValueError, match="outside the 173x251"):
        jc.decode_crop(data, 170, 0, 4, 10)
    with pytest.raises(ValueError, match="outside the 44x63 .* scale 2/8"):
        jc.decode_crop(data, 0, 60, 5, 4, 2)
    for args in [(-1, 0, 1, 1), (0, 0, 0, 1), (0, 0, 1, -3)]:
        with pytest.raises(ValueError, match="need y, x >= 0"):
            jc.decode_crop(data, *args)
    for k in (0, 9):
        with pytest.raises(ValueError, match="scale_num"):
            jc.decode_crop(data, 0, 0, 1, 1, k)
    with pytest.raises(TypeError):
        jc.decode_crop("not bytes", 0, 0, 1, 1)
    for box in [(170, 0, 4, 10), (0, 250, 1, 2), (-1, 0, 5, 5), (0, 0, 0, 5)]:
        with pytest.raises(ValueError, match="outside the 173x251"):
            images.decode_crop(data, box)


def test_any_bytes_like_input(jc):
    data = JPEGS["digits-420"]
    want = jc.decode_crop(data, 10, 20, 30, 25, 4)  # of the 60x48 image at 4/8
    assert len(want) == 30 * 25 * 3
    for view in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert jc.decode_crop(view, 10, 20, 30, 25, scale_num=4) == want
    out = images.decode_crop(data, (0, 0, 120, 96))
    assert out.shape == (120, 96, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_two_threads_give_the_sequential_results(jc):
    rng = np.random.default_rng(5)
    jobs = []
    for name, data in JPEGS.items():
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        for box in _random_boxes(rng, height, width, 10):
            jobs.append((data, box, int(rng.integers(10, 120)), bool(rng.integers(0, 2))))
    jobs = jobs * 3
    sequential = [images.decode_crop(d, b, m, m, fast=f) for d, b, m, f in jobs]
    results = [None] * len(jobs)

    def work(part):
        for i in range(part, len(jobs), 2):
            d, b, m, f = jobs[i]
            results[i] = images.decode_crop(d, b, m, m, fast=f)

    threads = [threading.Thread(target=work, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(sequential):
        np.testing.assert_array_equal(results[i], want)


def test_no_leak_on_success_and_error_paths(jc):
    good, cut = JPEGS["photo224-progressive"], JPEGS["photo224-420"][:4000]
    cmyk = io.BytesIO()
    Image.fromarray(_photo(32, 32)).convert("CMYK").save(cmyk, "JPEG")

    def churn(n):
        for _ in range(n):
            jc.decode_crop(good, 50, 60, 100, 90, 8, True)
            jc.decode_crop(cut, 0, 0, 200, 200)  # "premature end" warning
            for args in [
                (b"\xff\xd8\xff" + bytes(64), 0, 0, 1, 1),
                (cmyk.getvalue(), 0, 0, 1, 1),
                (good, 200, 0, 30, 5),
            ]:
                with pytest.raises(ValueError):
                    jc.decode_crop(*args)

    churn(200)  # warm-up: allocator pools
    before = psutil.Process().memory_info().rss
    churn(2000)
    grown = psutil.Process().memory_info().rss - before
    assert grown < 16 << 20, f"RSS grew {grown >> 20} MiB over 2000 rounds"  # a leak: >= 200 MiB
