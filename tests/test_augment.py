"""data/augment.py: crops, reduced-scale decode, flip, normalize, mixup."""

import cv2
import numpy as np
import pytest

from data import augment, images


def _photo(h=300, w=400):
    """A smooth synthetic image (JPEG-friendly, so reduced-scale decodes stay comparable)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], -1).astype(np.uint8)


def test_inception_crop_boxes_respect_ranges():
    rng = np.random.default_rng(0)
    cfg = augment.AugmentConfig(area_min=0.2, area_max=0.6)
    for _ in range(200):
        y, x, h, w = augment.sample_inception_crop(rng, 300, 400, cfg)
        assert 0 <= y and y + h <= 300 and 0 <= x and x + w <= 400
        assert 0.19 <= h * w / (300 * 400) <= 0.61
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_inception_crop_falls_back_to_central_crop():
    class NoLuck:  # areas that never fit force the fallback
        def uniform(self, lo, hi):
            return hi * 10

        def integers(self, lo, hi):
            raise AssertionError("unused")

    assert augment.sample_inception_crop(NoLuck(), 100, 400) == (0, 133, 100, 133)
    assert augment.sample_inception_crop(NoLuck(), 100, 100) == (0, 0, 100, 100)


def test_reduced_scale_decode_matches_full_decode():
    data = images.encode_jpeg(_photo(640, 800), 95)
    box = (40, 80, 480, 480)
    fast = augment.decode_crop_resize(data, box, (640, 800), 112)
    full = images.decode_scaled(data)[40:520, 80:560]
    slow = cv2.resize(full, (112, 112), interpolation=cv2.INTER_AREA)
    assert fast.shape == (112, 112, 3)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 2.0


def test_decode_scale_is_a_power_of_two_eighth_that_keeps_enough_pixels(monkeypatch):
    assert [
        augment.decode_scale(f) for f in (0.05, 0.125, 0.13, 0.3, 0.5, 0.51, 0.7, 1.0, 3.0)
    ] == [1, 1, 2, 4, 4, 8, 8, 8, 8]
    seen = []
    real = images.decode_crop
    monkeypatch.setattr(images, "decode_crop", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    data = images.encode_jpeg(_photo(640, 800), 95)
    out = augment.decode_crop_resize(data, (0, 0, 300, 300), (640, 800), 112)  # needs 112/300
    assert (
        seen[-1]["min_height"] == 320
        and seen[-1]["min_width"] == 400
        and out.shape == (112, 112, 3)
    )


def test_train_and_eval_image_shapes_and_determinism():
    data = images.encode_jpeg(_photo(), 95)
    a = augment.train_image(data, np.random.default_rng(1), 64)
    b = augment.train_image(data, np.random.default_rng(1), 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    e = augment.eval_image(data, 64)
    ref = cv2.resize(images.decode_scaled(data)[:, 50:350], (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(e.astype(int) - ref.astype(int)).mean() < 2.0
    png = images.encode_png(_photo(40, 40))
    assert augment.eval_image(png, 40).tolist() == _photo(40, 40).tolist()


def test_flip_mirrors_half_the_time_and_writes_into_out():
    data = images.encode_jpeg(_photo(), 95)
    cfg = augment.AugmentConfig(inception_crop=False)  # the rng then only decides the flip
    plain = augment.eval_image(data, 48)
    outs = {
        augment.train_image(data, np.random.default_rng(s), 48, cfg).tobytes() for s in range(20)
    }
    plain_fast = augment.decode_crop_resize(
        data,
        augment.central_square(*images.image_size(data)),
        images.image_size(data),
        48,
        fast=True,
    )
    assert outs == {plain_fast.tobytes(), plain_fast[:, ::-1].tobytes()}
    assert np.abs(plain_fast.astype(int) - plain.astype(int)).mean() < 2.0  # fast DCT: close
    batch = np.zeros((3, 48, 48, 3), np.uint8)
    res = augment.eval_image(data, 48, out=batch[1])
    assert np.shares_memory(res, batch) and np.array_equal(batch[1], plain) and not batch[0].any()


def test_normalize_mixup():
    n = augment.normalize(np.array([0, 127, 255], np.uint8))
    assert n.dtype == np.float32 and n[0] == -1 and n[2] == 1
    x = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    y = np.eye(10, dtype=np.float32)[np.arange(8)]
    mx, my = augment.mixup(np.random.default_rng(0), x, y, 0.4)
    assert mx.dtype == np.float32 and mx.shape == x.shape and -1 <= mx.min() and mx.max() <= 1
    np.testing.assert_allclose(my.sum(-1), 1, rtol=1e-6)
    a = my[1, 1]
    assert a >= 0.5 and np.isclose(my[1, 0], 1 - a)  # mixed with its neighbour (roll by 1)
    np.testing.assert_allclose(
        mx[1], a * augment.normalize(x[1]) + (1 - a) * augment.normalize(x[0]), atol=1e-5
    )


def test_config_from_any():
    assert augment.AugmentConfig.from_any(None) == augment.AugmentConfig()
    assert augment.AugmentConfig.from_any({"flip": False}).flip is False
    with pytest.raises(ValueError, match="unknown key"):
        augment.AugmentConfig.from_any({"flips": False})
    with pytest.raises(ValueError, match="area_min"):
        augment.AugmentConfig(area_min=0)
