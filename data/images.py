"""Image bytes <-> RGB uint8 arrays: the validating decoder used by `prepare`, the cheap decoder
used by the loaders, and the encoders. numpy/simplejpeg/OpenCV/Pillow only (no TensorFlow).

Validation turns every way an input can be unusable into an `ImageRejected` with one reason out
of `REASONS`, so `prepare` can dead-letter it. Accepted inputs come back as RGB uint8 [H, W, 3]:
grayscale/palette/CMYK are converted, alpha is composited over white (transparent pixels carry
arbitrary colours otherwise), 16-bit samples keep their high byte, EXIF orientation is applied.

The loader's cropped decode (`decode_crop`) uses the optional C extension `data._jpeg_crop`
(libjpeg-turbo's jpeg_crop_scanline + jpeg_skip_scanlines, built by setup.py); without it, it
decodes the whole image at the same scale and slices.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    from data import _jpeg_crop
except ImportError:  # built without libjpeg-turbo headers (setup.py: optional extension)
    _jpeg_crop = None

HAS_CROPPED_DECODE: bool = _jpeg_crop is not None  # decode_crop skips undecoded rows/columns

Box = tuple[int, int, int, int]  # (y, x, height, width) in source pixels

# Reasons an input is rejected (the `reason` of a dead letter). Sources add their own
# ("unreadable", "bad_name", "bad_metadata") and prepare adds "duplicate_id".
REASONS = (
    "empty",  # zero bytes
    "unsupported_format",  # decodable container we do not accept (e.g. PDF, ICO)
    "undecodable",  # not an image / corrupt header / corrupt data
    "truncated",  # data ends early
    "too_large",  # file bytes, a side or the pixel count above the limits (bomb guard)
    "too_small",  # shorter side below the limit
    "unsupported_mode",  # pixel format with no faithful RGB meaning (float, 32-bit int)
)
_FORMATS = {"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM"}
_JPEG_MAGIC = b"\xff\xd8\xff"


class ImageRejected(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Limits:
    """Acceptance limits. `max_pixels` is the decompression-bomb guard: it is checked against
    the header's dimensions *before* any pixel is decoded."""

    min_side: int = 16
    max_side: int = 32768
    max_pixels: int = 89_478_485  # Pillow's own warning threshold (~0.25 GiB of RGBA)
    max_bytes: int = 64 << 20


def _check_dims(height: int, width: int, limits: Limits) -> None:
    if height * width > limits.max_pixels or max(height, width) > limits.max_side:
        raise ImageRejected(
            "too_large",
            f"{width}x{height} exceeds max_side={limits.max_side} "
            f"or max_pixels={limits.max_pixels}",
        )
    if min(height, width) < limits.min_side:
        raise ImageRejected(
            "too_small", f"{width}x{height} has a side below min_side={limits.min_side}"
        )


def _jpeg_orientation(data: bytes) -> int:
    """EXIF orientation of a JPEG (1 = upright), parsed from the header only."""
    if b"Exif\x00\x00" not in data[:65536]:
        return 1
    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not a reason to reject the pixels
        return 1


def _decode_jpeg_fast(data: bytes, limits: Limits) -> np.ndarray | None:
    """libjpeg-turbo path for plain YCbCr/gray JPEGs; None when Pillow must handle it."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise ImageRejected("undecodable", f"bad JPEG header: {e}") from e
    _check_dims(height, width, limits)
    if colorspace not in ("YCbCr", "Gray", "RGB") or _jpeg_orientation(data) != 1:
        return None  # CMYK/YCCK (Adobe inversion) and rotated images: Pillow knows both
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError as e:
        msg = str(e)
        if "Premature end" in msg or "premature" in msg.lower():
            raise ImageRejected("truncated", msg) from e
        raise ImageRejected("undecodable", msg) from e


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        return _composite_white(np.asarray(im.convert("RGBA")))
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return np.asarray(im.convert("RGB"))
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        if mode == "I" and (a.min() < 0 or a.max() > 65535):
            raise ImageRejected(
                "unsupported_mode", f"32-bit integer samples in [{a.min()}, {a.max()}]"
            )
        gray = (a.astype(np.uint32) >> 8).astype(np.uint8)  # 16-bit -> high byte (not clipping)
        return np.repeat(gray[..., None], 3, axis=-1)
    raise ImageRejected("unsupported_mode", f"pixel mode {mode!r} has no RGB conversion")


def _decode_pillow(data: bytes, limits: Limits) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below is the guard; Pillow still hard-fails beyond 2x its
            # threshold at open(), which lands in "too_large" too.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageRejected("too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise ImageRejected("undecodable", "not a recognised image format") from e
    except Exception as e:
        raise ImageRejected("undecodable", f"{type(e).__name__}: {e}") from e
    with im:
        if im.format not in _FORMATS:
            raise ImageRejected("unsupported_format", f"format {im.format}")
        width, height = im.size
        _check_dims(height, width, limits)  # before load(): the bomb guard
        try:
            im.load()
        except OSError as e:
            if "truncated" in str(e) or "broken data stream" in str(e):
                raise ImageRejected("truncated", str(e)) from e
            raise ImageRejected("undecodable", str(e)) from e
        except Exception as e:
            raise ImageRejected("undecodable", f"{type(e).__name__}: {e}") from e
        im = ImageOps.exif_transpose(im) or im
        return np.ascontiguousarray(_to_rgb(im))


def decode_rgb(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Validating decode of any accepted format -> RGB uint8 [H, W, 3]; raises ImageRejected."""
    if not data:
        raise ImageRejected("empty", "0 bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes > max_bytes={limits.max_bytes}")
    img = _decode_jpeg_fast(data, limits) if data[:3] == _JPEG_MAGIC else None
    if img is None:
        img = _decode_pillow(data, limits)
    _check_dims(img.shape[0], img.shape[1], limits)  # after EXIF rotation
    return img


def resize_shorter(img: np.ndarray, size: int, *, upscale: bool = False) -> np.ndarray:
    """Resizes so the shorter side is `size` (aspect kept). Without `upscale`, images already
    at most that size are returned unchanged (upscaling adds bytes, not information)."""
    height, width = img.shape[:2]
    short = min(height, width)
    if size <= 0 or short == size or (short < size and not upscale):
        return img
    scale = size / short
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(img, (new_w, new_h), interpolation=interp)


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    # 4:2:0 chroma subsampling: what cameras and ImageNet use, and it decodes fastest in the
    # loader (docs/DESIGN.md §6, loader anchor).
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(img), quality=quality, colorspace="RGB", colorsubsampling="420"
    )


def encode_png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(
        ".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3]
    )
    if not ok:
        raise ValueError("OpenCV failed to encode PNG")
    return buf.tobytes()


# --- loader side: records written by prepare are RGB JPEG or PNG ---------------------------------


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of a record's image from its header, without decoding pixels."""
    if data[:3] == _JPEG_MAGIC:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return height, width
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    img = decode_scaled(data)
    return img.shape[0], img.shape[1]


def decode_scaled(
    data: bytes, min_height: int = 0, min_width: int = 0, *, fast: bool = False
) -> np.ndarray:
    """Cheap decode -> RGB uint8. JPEGs decode at the smallest libjpeg scale (k/8) that keeps
    the result at least min_height x min_width: a 4x smaller decode is ~3x faster. `fast` uses
    libjpeg's fast integer DCT and plain chroma upsampling (~1.7x faster on 4:2:0 here; the
    error is far below what random crops and resizes change) - for training only."""
    if data[:3] == _JPEG_MAGIC:
        return simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_height=min_height,
            min_width=min_width,
            strict=False,
            fastdct=fast,
            fastupsample=fast,
        )
    bgr = cv2.imdecode(
        np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    )
    if bgr is None:
        raise ValueError(f"cannot decode image ({len(data)} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _jpeg_scale_num(height: int, width: int, min_height: int, min_width: int) -> int:
    """k of the k/8 scale `decode_scaled` (simplejpeg 1.9) decodes a height x width JPEG at.

    simplejpeg picks the output size with the smallest TurboJPEG factor (those <= 1 are all
    k/8) whose ceil(side*k/8) meets both minimums (a minimum <= 0 is ignored, one above the side
    counts as the side; neither set: full size); tjDecompress2 then decodes with the *largest*
    factor that fits that size. The two differ only when both sides are < 8 (a 5x5 JPEG is 5x5
    at 7/8 and 8/8, decoded at 8/8), but the IDCT, and so every pixel, depends on k."""
    if min_height <= 0 and min_width <= 0:
        return 8
    min_height, min_width = min(height, min_height), min(width, min_width)
    k = next(
        (
            k
            for k in range(1, 8)
            if -(-height * k // 8) >= min_height and -(-width * k // 8) >= min_width
        ),
        8,
    )
    out_h, out_w = -(-height * k // 8), -(-width * k // 8)
    while k < 8 and -(-height * (k + 1) // 8) <= out_h and -(-width * (k + 1) // 8) <= out_w:
        k += 1
    return k


def _scaled_box(
    box: Box, full_hw: tuple[int, int], scaled_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """`box` in source pixels -> (y0, x0, y1, x1) in an image decoded at scaled_hw (>= 1 pixel
    each way): the rows and columns `decode_crop` returns."""
    y, x, h, w = box
    sy, sx = scaled_hw[0] / full_hw[0], scaled_hw[1] / full_hw[1]
    y0, x0 = int(y * sy), int(x * sx)
    y1 = max(y0 + 1, min(scaled_hw[0], int(round((y + h) * sy))))
    x1 = max(x0 + 1, min(scaled_hw[1], int(round((x + w) * sx))))
    return y0, x0, y1, x1


def decode_crop(
    data: bytes, box: Box, min_height: int = 0, min_width: int = 0, *, fast: bool = False
) -> np.ndarray:
    """`box` (y, x, height, width; source pixels) of the image at the scale `decode_scaled`
    picks for min_height x min_width -> C-contiguous RGB uint8 [h', w', 3].

    Exactly `decode_scaled(data, min_height, min_width, fast=fast)` sliced to the box mapped to
    that scale (`_scaled_box`), but for JPEGs with the extension only the box is decoded: rows
    below it not at all, rows above it entropy-decoded only, columns outside the box's iMCU
    columns not inverse-transformed/colour-converted. The result may be read-only (a view of the
    decoder's bytes): copy before writing into it. A box outside the image raises ValueError."""
    if data[:3] == _JPEG_MAGIC:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        _check_box(box, height, width)
        # CMYK/YCCK: libjpeg has no conversion to RGB (simplejpeg converts them itself)
        if HAS_CROPPED_DECODE and colorspace not in ("CMYK", "YCCK"):
            k = _jpeg_scale_num(height, width, min_height, min_width)
            scaled_hw = (-(-height * k // 8), -(-width * k // 8))
            y0, x0, y1, x1 = _scaled_box(box, (height, width), scaled_hw)
            pixels = _jpeg_crop.decode_crop(data, y0, x0, y1 - y0, x1 - x0, k, fast)
            return np.frombuffer(pixels, np.uint8).reshape(y1 - y0, x1 - x0, 3)
        image = decode_scaled(data, min_height, min_width, fast=fast)
    else:
        image = decode_scaled(data, min_height, min_width, fast=fast)  # full size: not a JPEG
        height, width = image.shape[:2]
        _check_box(box, height, width)
    y0, x0, y1, x1 = _scaled_box(box, (height, width), image.shape[:2])
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def _check_box(box: Box, height: int, width: int) -> None:
    y, x, h, w = box
    if y < 0 or x < 0 or h < 1 or w < 1 or y + h > height or x + w > width:
        raise ValueError(
            f"crop box (y={y}, x={x}, h={h}, w={w}) is outside the {height}x{width} (HxW) image"
        )
