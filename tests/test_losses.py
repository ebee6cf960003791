"""trainer.losses against float64 numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from trainer import losses

RNG = np.random.default_rng(0)
B, C = 6, 9


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logits_labels():
    logits = RNG.normal(scale=3.0, size=(B, C)).astype(np.float32)
    labels = (RNG.random((B, C)) < 0.3).astype(np.float32)
    labels[0] = 0.0  # an example without positives
    labels[1, :] = 0.0
    labels[1, 4] = 1.0  # a one-hot example
    return logits, labels


def test_sigmoid_xent_matches_numpy():
    logits, labels = _logits_labels()
    x = logits.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    want = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).sum(-1)
    got = losses.sigmoid_xent(jnp.asarray(logits), jnp.asarray(labels))
    assert got.shape == (B,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sigmoid_xent_large_logits_are_exact():
    logits = jnp.array([[1000.0, -1000.0, 80.0], [1000.0, -1000.0, -80.0]])
    labels = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    got = losses.sigmoid_xent(logits, labels)
    # Right answers cost ~exp(-|x|); wrong ones exactly |x| (log(sigmoid) would give inf here).
    np.testing.assert_allclose(got, [np.exp(-80.0), 2080.0], rtol=1e-6)


def test_sigmoid_xent_bf16_logits_computed_in_f32():
    logits, labels = _logits_labels()
    logits_bf16 = jnp.asarray(logits * 40.0, jnp.bfloat16)
    got = losses.sigmoid_xent(logits_bf16, jnp.asarray(labels, jnp.bfloat16))
    assert got.dtype == jnp.float32
    x = np.asarray(logits_bf16.astype(jnp.float32), np.float64)
    want = -(labels * _np_log_sigmoid(x) + (1 - labels) * _np_log_sigmoid(-x)).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)  # bf16 math would be off by ~1e-2


def test_softmax_xent_one_hot_and_multi_hot():
    logits, labels = _logits_labels()
    logp = _np_log_softmax(logits.astype(np.float64))
    target = labels / np.maximum(labels.sum(-1, keepdims=True), 1.0)  # 1/k per positive
    want = -(target * logp).sum(-1)
    got = losses.softmax_xent(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[0] == 0.0  # no positives, no smoothing: nothing to predict
    np.testing.assert_allclose(got[1], -logp[1, 4], rtol=1e-5)


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_softmax_xent_label_smoothing(eps):
    logits, labels = _logits_labels()
    logp = _np_log_softmax(logits.astype(np.float64))
    dist = labels / np.maximum(labels.sum(-1, keepdims=True), 1.0)
    target = (1 - eps) * dist + eps / C
    want = -(target * logp).sum(-1)
    got = losses.softmax_xent(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=eps)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Smoothing of a one-hot target in closed form: (1-eps)*NLL(true) + eps*mean(NLL(all)).
    closed = (1 - eps) * -logp[1, 4] + eps * -logp[1].mean()
    np.testing.assert_allclose(got[1], closed, rtol=1e-5)


def test_softmax_xent_large_logits_and_bf16():
    logits = jnp.array([[2048.0, 0.0, -2048.0]], jnp.bfloat16)  # exact in bf16
    labels = jnp.array([[0.0, 1.0, 0.0]])
    got = losses.softmax_xent(logits, labels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, [2048.0], rtol=1e-6)
    np.testing.assert_allclose(
        losses.softmax_xent(logits, labels, 0.3),
        [0.7 * 2048.0 + 0.1 * (0.0 + 2048.0 + 4096.0)],
        rtol=1e-6,
    )


def test_softmax_xent_bad_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.softmax_xent(jnp.zeros((1, 3)), jnp.ones((1, 3)), label_smoothing=1.0)


def test_top1_correct_multi_hot():
    logits = jnp.array([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    labels = jnp.array([[0, 1, 1], [0, 1, 1], [0, 0, 0], [1, 0, 0]], jnp.float32)
    got = losses.top1_correct(logits, labels)
    assert got.dtype == jnp.bool_
    # argmax 1 in {1,2}; argmax 0 not in {1,2}; no positives; tie -> lowest index 0 in {0}.
    np.testing.assert_array_equal(got, [True, False, False, True])


def test_shape_mismatch_is_an_error():
    for fn in (losses.sigmoid_xent, losses.softmax_xent, losses.top1_correct):
        with pytest.raises(ValueError, match="same shape"):
            fn(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_masked_sum():
    x = jnp.array([1.0, 2.0, 3.0, jnp.nan])
    mask = jnp.array([True, True, False, False])
    assert float(losses.masked_sum(x, mask)) == 3.0  # NaN padding does not leak
    assert float(losses.masked_sum(x[:3], jnp.ones(3, bool))) == 6.0
    assert float(losses.masked_sum(x, jnp.zeros(4, bool))) == 0.0
    bf16 = jnp.array([1, 2], jnp.bfloat16)
    assert losses.masked_sum(bf16, jnp.ones(2, bool)).dtype == jnp.float32
    with pytest.raises(ValueError, match="mask"):
        losses.masked_sum(x, mask[:2])
