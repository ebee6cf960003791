"""The model's attention-stats option and benchmarks/qk_norm.py's micro run through the real loop.

No outcome of the sweep is asserted: only that the logged stats exist per step and are finite, and
that the option, off (the default), leaves the model exactly as it is.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import qk_norm
from trainer import losses
from trainer.models import vit
from trainer.task import classifier

STATS = ("attn_logit_max", "attn_entropy_min", "attn_entropy_mean")


def test_attn_stats_off_by_default_costs_nothing_and_on_changes_no_param_or_output():
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    batch = {"image": x, "labels": np.eye(10, dtype=np.float32)[[1, 2]]}
    small = dict(width=32, depth=2, mlp_dim=64, num_heads=2, image_size=16, num_classes=10)
    off = vit.make_config("mu/4", **small)
    on = vit.make_config("mu/4", **small, attn_stats=True)
    assert off.attn_stats is False and "attn_stats" not in off.to_json()["overrides"]

    def everything(
        cfg,
    ):  # one compile per config: init, forward with "intermediates" mutable, the Task's loss
        # (XLA's lowest backend optimization level halves the compile; both configs get the same.)
        model, task = vit.ViT(cfg), classifier("t", vit.ViT(cfg), losses.softmax_xent)

        def f(rng):
            params = model.init(rng, x)
            (y, _), sown = model.apply(params, x, mutable=["intermediates"])
            loss, aux = task.loss(params["params"], {}, batch, rng)
            return params, y, sown, loss, aux

        rng = jax.random.PRNGKey(0)
        return (
            jax.jit(f)
            .lower(rng)
            .compile(compiler_options={"xla_backend_optimization_level": 0})(rng)
        )

    p_off, y_off, sown_off, loss_off, aux_off = everything(off)
    p_on, y_on, sown_on, loss_on, aux_on = everything(on)
    same = lambda a, b: jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda u, v: bool(jnp.array_equal(u, v)), a, b)
    )
    assert same(p_off, p_on)  # (the stats are stop_gradient: equal outputs mean equal gradients)
    np.testing.assert_array_equal(y_off, y_on)
    assert float(loss_off) == float(loss_on)
    assert not jax.tree_util.tree_leaves(sown_off)  # off: nothing is computed or sown
    assert set(aux_off) == {"train_top1"} and set(aux_on) == {"train_top1", *STATS}
    layers = sown_on["intermediates"]["Transformer"]["encoderblock"]  # scanned: stacked per layer
    assert layers["attn_logit_max"][0].shape == (off.depth,)
    assert layers["attn_entropy"][0].shape == (off.depth, off.num_heads)
    # Entropy of a softmax row over seq_len keys lies in [0, log seq_len].
    assert np.all(
        (layers["attn_entropy"][0] >= 0)
        & (layers["attn_entropy"][0] <= math.log(off.seq_len) + 1e-5)
    )
    assert float(aux_on["attn_logit_max"]) == float(jnp.max(layers["attn_logit_max"][0]))


def test_qk_norm_micro_run_logs_finite_attention_stats_every_step(
    prepared_digits, tmp_path, capsys
):
    runs = qk_norm.main(
        [
            "--preset",
            "micro",
            "--prepared",
            str(prepared_digits),
            "--workdir",
            str(tmp_path),
            "--steps",
            "3",
            "--variants",
            "no_qk_norm",
        ]
    )
    assert [r["variant"] for r in runs] == ["no_qk_norm"]
    logs = sorted(tmp_path.glob("*/metrics.jsonl"))
    assert len(logs) == 1
    for log in logs:
        steps = [json.loads(line) for line in log.read_text().splitlines()]
        steps = [r for r in steps if "loss" in r]
        assert [r["step"] for r in steps] == [1, 2, 3]
        for r in steps:
            for key in STATS:
                assert math.isfinite(r[key]), (log, r)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("|"))
    assert [c.strip() for c in header.strip("|").split("|")] == qk_norm.COLUMNS
