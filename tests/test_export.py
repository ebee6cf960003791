"""Export to timm / npz and import from timm / big_vision (trainer/interop/export.py,
trainer/interop/weights_import.py).

Parity is checked against timm itself (the `[timm]` extra: CPU inference with the CUDA torch
build, docs/DESIGN.md §6) on real digits images: the ViT-22B parallel block with RMSNorm (the
shared pretrain export) and with bias-free LayerNorm, and the classic sequential block;
big_vision names are checked against timm's own big_vision .npz loader.
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from trainer import checkpoint, sharding, transfer
from trainer.interop import export, npz_format, param_layout, timm_format, weights_import
from trainer.models import vit

torch = pytest.importorskip("torch", reason="the [timm] extra (make installs it)")
timm = pytest.importorskip("timm", reason="the [timm] extra (make installs it)")

RTOL = 1e-5


@pytest.fixture(scope="module")
def digits(prepared_digits):
    """32 real digits val images, [-1, 1], NHWC float32."""
    from data import loader

    mesh = sharding.make_mesh(data=8, model=1)
    batch = next(
        iter(
            loader.eval_loader(
                prepared_digits / "digits" / "val",
                global_batch_size=32,
                image_size=32,
                sharding=sharding.batch_sharding(mesh),
            )
        )
    )
    return np.asarray(batch["image"], np.float32)


def _random_params(cfg: vit.ViTConfig, seed: int = 0) -> dict:
    """A tiny model's params with every tensor random (biases and norm scales too, so that a
    bias or scale put in the wrong place cannot hide behind its zero/one init)."""
    params = nn.unbox(vit.abstract_params(cfg))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: (
            rng.standard_normal(a.shape) * (0.3 if len(a.shape) > 1 else 0.1)
            + (1.0 if len(a.shape) == 1 else 0.0)
        ).astype(np.float32),
        params,
    )


def _ours(cfg, params, images):
    logits, out = vit.ViT(cfg).apply({"params": params}, images)
    return np.asarray(out["encoded"]), (np.asarray(logits) if cfg.num_classes else None)


def _timm(out_dir, images):
    model = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        features = model.forward_features(x)
        logits = model.forward_head(features)
    return model, features.numpy(), logits.numpy()


def _close(got, want, what):
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    print(f"{what}: relative error {err:.2e}")  # shown with -s
    assert err < RTOL, f"{what}: max |diff| / max |ours| = {err:.2e}"


def _eq_trees(a, b):
    fa, fb = npz_format.flatten(a), npz_format.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def test_pretrain_export_matches_timm_and_round_trips(pretrain_export, digits, tmp_path, capsys):
    """mu/4 (parallel block, RMSNorm, QK-norm, MAP head with QK-norm): timm's ParallelScalingBlock
    encoder matches ours; the MAP head has no timm counterpart, so the export is the encoder."""
    assert (
        export.main(
            [
                "--stage_dir",
                str(pretrain_export.path),
                "--format",
                "timm",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 0
    )
    assert "encoder only" in capsys.readouterr().out
    model = checkpoint.open_model(pretrain_export.path, "test")
    cfg, params = model.config, model.load()
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_xp_224" and not config["head_exported"]
    model, features, _ = _timm(tmp_path / "t", digits)
    assert type(model.blocks[0]).__name__ == "ParallelScalingBlock"
    _close(features, _ours(cfg, params, digits)[0], "encoded")
    # ours -> timm -> ours: the encoder bit-exact; the MAP head cannot come back (named).
    encoder_only = dataclasses.replace(cfg, head="gap", num_classes=0)
    back = timm_format.from_timm(timm_format.load_state_dict(tmp_path / "t"), encoder_only)
    want = {k: v for k, v in params.items() if k not in ("MAPHead_0", "head_kernel", "head_bias")}
    _eq_trees(back, want)
    with pytest.raises(ValueError, match=r"attn_pool.latent is missing"):
        weights_import.read(tmp_path / "t" / "model.safetensors", cfg)
    # npz: ours -> npz -> ours bit-exact, heads included.
    assert (
        export.main(
            [
                "--stage_dir",
                str(pretrain_export.path),
                "--format",
                "npz",
                "--out",
                str(tmp_path / "p.npz"),
            ]
        )
        == 0
    )
    _eq_trees(weights_import.read(tmp_path / "p.npz", cfg)[0], params)


CASES = {
    # The ViT-22B block with a bias-free LayerNorm, fused, unscanned; a GAP head (timm: avg pool,
    # no fc_norm).
    "parallel_layernorm": dict(variant="mu/4", norm="layernorm", head="gap", scan=False),
    # Unfused parallel block with biases and a class token.
    "parallel_bias_token": dict(
        variant="mu/4", norm="layernorm", use_bias=True, head="token", fused=False
    ),
    # The classic block (scanned, fused QKV) with a MAP head without QK-norm: timm's attention pool.
    "sequential_map": dict(
        variant="mu/4",
        block="sequential",
        norm="layernorm",
        use_bias=True,
        qk_norm=False,
        head="map",
    ),
    # A sequential block with QK-norm and RMSNorm, sincos position embedding.
    "sequential_rms_qknorm": dict(
        variant="mu/4", block="sequential", head="gap", posemb="sincos2d"
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_models_match_timm_and_round_trip(case, digits, tmp_path):
    kw = dict(CASES[case])
    cfg = vit.make_config(kw.pop("variant"), image_size=32, num_classes=10, **kw)
    params = _random_params(cfg, seed=len(case))
    config = timm_format.save(tmp_path / "t", params, cfg)
    assert config["head_exported"]
    model, features, logits = _timm(tmp_path / "t", digits)
    encoded, ours_logits = _ours(cfg, params, digits)
    _close(features, encoded, f"{case} encoded")
    _close(logits, ours_logits, f"{case} logits")
    # ours -> timm -> ours, bit-exact (through init_params' reader, i.e. the safetensors file).
    back, src, kind = weights_import.read(tmp_path / "t" / "model.safetensors", cfg)
    assert kind == "timm" and src == cfg
    _eq_trees(back, params)
    # ... and into the other layout of the same math (fused <-> unfused, scanned <-> unrolled).
    other = dataclasses.replace(cfg, fused=not cfg.fused, scan=not cfg.scan)
    converted = timm_format.from_timm(timm_format.load_state_dict(tmp_path / "t"), other)
    if (
        cfg.block == "parallel" and cfg.use_bias
    ):  # the fused block sums the two output biases: same math
        _close(
            _ours(other, converted, digits)[1], ours_logits, f"{case} logits in the other layout"
        )
    else:
        _eq_trees(
            param_layout.to_canonical(converted, other), param_layout.to_canonical(params, cfg)
        )


def test_big_vision_npz_matches_timms_reader_and_imports_bit_exact(digits, tmp_path):
    """A big_vision-named npz (scanned = stacked layers, as big_vision saves) read by timm's own
    big_vision loader agrees with our model; our import of it is bit-exact."""
    cfg = vit.make_config(
        "mu/4",
        image_size=32,
        num_classes=10,
        block="sequential",
        norm="layernorm",
        use_bias=True,
        qk_norm=False,
        head="map",
    )
    params = _random_params(cfg, seed=7)
    flat = npz_format.to_big_vision(params, cfg)
    scanned = {}
    for (
        k,
        v,
    ) in flat.items():  # big_vision's scanned layout: Transformer/encoderblock/... [depth, ...]
        if k.startswith("Transformer/encoderblock_"):
            rest = k.split("/", 2)[2]
            scanned.setdefault(f"Transformer/encoderblock/{rest}", []).append(v)
        else:
            scanned[k] = v
    scanned = {k: np.stack(v) if isinstance(v, list) else v for k, v in scanned.items()}
    np.savez(tmp_path / "bv.npz", **{f"params/{k}": v for k, v in scanned.items()})
    _, args, _, _ = timm_format.model_args(cfg)
    model = timm.create_model(timm_format._ARCH[cfg.block], pretrained=False, **args).eval()
    model.load_pretrained(str(tmp_path / "bv.npz"))
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(digits.transpose(0, 3, 1, 2)))).numpy()
    _close(logits, _ours(cfg, params, digits)[1], "big_vision logits")
    back, src, kind = weights_import.read(tmp_path / "bv.npz", cfg)
    assert kind == "big_vision"
    _eq_trees(back, params)
    with pytest.raises(ValueError, match=r"model's.block='parallel'.*classic block"):
        weights_import.read(tmp_path / "bv.npz", dataclasses.replace(cfg, block="parallel"))


def test_import_errors_name_the_first_mismatched_parameter(tmp_path):
    cfg = vit.make_config("mu/4", image_size=32, num_classes=10, head="gap")
    params = _random_params(cfg)
    timm_format.save(tmp_path / "t", params, cfg)
    sd = timm_format.load_state_dict(tmp_path / "t")
    wider = dataclasses.replace(cfg, mlp_dim=512)
    with pytest.raises(
        ValueError,
        match=r"^\S+model.safetensors: parameter blocks.0.in_proj.weight has shape "
        r"\(448, 64\), the model needs \(704, 64\)$",
    ):
        weights_import.read(tmp_path / "t" / "model.safetensors", wider)
    extra = dict(sd, **{"blocks.0.ls.gamma": np.ones(64, np.float32)})
    with pytest.raises(ValueError, match=r"parameter blocks.0.ls.gamma has no place in the model"):
        timm_format.from_timm(extra, cfg, "x")
    with pytest.raises(ValueError, match=r"parameter blocks.1.in_norm.weight is missing"):
        timm_format.from_timm(
            {k: v for k, v in sd.items() if k != "blocks.1.in_norm.weight"}, cfg, "x"
        )
    with pytest.raises(ValueError, match=r"norm='rmsnorm' with use_bias=True"):
        timm_format.model_args(dataclasses.replace(cfg, use_bias=True))


def test_init_params_adapts_resolution_and_head(tmp_path):
    """A timm checkpoint at 32 px with 10 classes starts a 48 px, 3-class model: position embedding
    resized (trainer/transfer.py), new zero head; placed into the model's shardings."""
    cfg = vit.make_config("mu/4", image_size=32, num_classes=10, head="gap")
    params = _random_params(cfg)
    timm_format.save(tmp_path / "t", params, cfg)
    target = dataclasses.replace(cfg, image_size=48, num_classes=3)
    mesh = sharding.make_mesh(data=4, model=2)
    boxed = vit.abstract_params(target)
    abstract = checkpoint.abstract_with_shardings(
        nn.unbox(boxed), sharding.param_shardings(boxed, mesh)
    )
    placed, what = transfer.load_into(tmp_path / "t", target.to_json(), abstract, mesh)
    assert "resized 32px -> 48px" in what and "10 -> 3 classes" in what
    assert placed["pos_embedding"].shape == (1, 144, 64) and not np.any(
        np.asarray(placed["head_kernel"])
    )
    assert (
        placed["Transformer"]["encoderblock"]["in_kernel"].sharding
        == abstract["Transformer"]["encoderblock"]["in_kernel"].sharding
    )
    np.testing.assert_array_equal(
        np.asarray(placed["embedding_kernel"]), params["embedding_kernel"]
    )


def test_a_training_stage_starts_from_an_exported_npz(pretrain_export, prepared_digits, tmp_path):
    """init_params = our .npz export, through the loop (trainer/loop.py): with lr 0 the stage's
    exported params are the imported ones, bit for bit."""
    from launch.configs import tiny
    from trainer import pretrain

    assert (
        export.main(
            [
                "--stage_dir",
                str(pretrain_export.path),
                "--format",
                "npz",
                "--out",
                str(tmp_path / "p.npz"),
            ]
        )
        == 0
    )
    cfg = tiny.pretrain_config()
    cfg.data.prepared_dir = str(prepared_digits)
    cfg.steps, cfg.checkpoint_every, cfg.evals = 1, 0, {}
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.cooldown_steps = 0.0, 0, 0
    cfg.runtime.progress = "off"
    cfg.init_params = str(tmp_path / "p.npz")
    pretrain.run(cfg, {}, tmp_path / "run")
    _eq_trees(
        checkpoint.load_params(tmp_path / "run" / "params"),
        checkpoint.open_model(pretrain_export.path, "test").load(),
    )
