"""The loop's Task seams, with a second Task that is not pretraining: a student regressing the
logits of a frozen teacher on digits, built only from trainer/task.py + trainer/loop.py."""
import ast
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from trainer import checkpoint, loop, stage_config
from trainer.models import vit
from trainer.task import Frozen, Task, vit_init

REPO = Path(__file__).resolve().parents[1]


def _state_leaves(step_dir: Path) -> dict[tuple, tuple]:
    """{key path: global shape} of a checkpoint's `state` item, from Orbax's metadata."""
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.metadata((step_dir / "state").absolute()).item_metadata.tree
    return {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_a_frozen_teacher_task_trains_through_the_loop(prepared_digits, tmp_path):
    teacher_cfg = vit.make_config("mu/4", image_size=32, num_classes=10, depth=1, head_zeroinit=False)
    student_cfg = vit.make_config("mu/4", image_size=32, num_classes=10, depth=1, width=32, num_heads=2,
                                  mlp_dim=64, head_zeroinit=False)
    teacher, student = vit.ViT(teacher_cfg), vit.ViT(student_cfg)
    saved = jax.device_get(nn.unbox(vit_init(teacher)(jax.random.PRNGKey(7))))
    checkpoint.save_params(tmp_path / "teacher", saved)
    loaded = []

    def load(abstract):
        params = checkpoint.load_params(tmp_path / "teacher", abstract)
        loaded.append(params)
        return params

    def regression(params, frozen, batch, rng):
        target, _ = teacher.apply({"params": frozen}, batch["image"])
        logits, _ = student.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
        return jnp.mean(jnp.square(logits - target)), {"target_std": jnp.std(target)}

    task = Task(name="toy", init=vit_init(student), loss=regression,
                predict={"logits": lambda p, f, b: student.apply({"params": p}, b["image"])[0]},
                frozen=Frozen(vit.abstract_params(teacher_cfg), load), model_spec=student_cfg.to_json())

    cfg = stage_config.training_group()
    cfg.data.prepared_dir = str(prepared_digits)
    cfg.data.augment.inception_crop, cfg.data.augment.flip = False, False
    cfg.batch_size = cfg.eval_batch_size = 32
    cfg.steps = 12
    cfg.mesh.data, cfg.mesh.model = 4, 2
    cfg.optim.optimizer, cfg.optim.lr, cfg.optim.warmup_steps = "adamw", 3e-3, 0
    cfg.checkpoint_every = 6
    cfg.runtime.log_every = 1
    cfg.runtime.async_checkpoint = False
    cfg.evals.val = dict(type="classification", split="val", every=6)
    stage_config.check(cfg, "toy")
    out = tmp_path / "out"
    result = loop.run(cfg, {}, out, lambda env: task, stage="toy")

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] and "target_std" in train_rows[-1]
    assert [r["step"] for r in rows if "val/top1" in r] == [6, 12] and "val/top1" in result["metrics"]

    # Frozen params: loaded once, never donated (still readable) nor changed by training.
    (frozen,) = loaded
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(frozen), saved)

    # ... and neither optimised nor checkpointed: the state holds the student alone.
    student_shapes = sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(vit.abstract_params(student_cfg))))
    leaves = _state_leaves(out / "checkpoints" / "12")
    assert sorted(s for k, s in leaves.items() if k[0] == "params") == student_shapes
    moments = sorted(s for k, s in leaves.items() if k[0] == "opt_state" and s)  # Adam's mu and nu
    assert moments == sorted(student_shapes * 2)
    exported = checkpoint.load_params(out / "params")
    assert jax.tree_util.tree_structure(exported) == jax.tree_util.tree_structure(
        nn.unbox(vit.abstract_params(student_cfg)))
    assert checkpoint.read_model_json(out / "model.json")["overrides"]["width"] == 32


def test_pretrain_is_a_task_and_no_stage_module_holds_a_loop():
    """The training loop exists once: stage modules call loop.run and contain no step loop."""
    for module in ("trainer/pretrain.py",):
        tree = ast.parse((REPO / module).read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.While, ast.For))], module
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "run"
                 and isinstance(n.value, ast.Name) and n.value.id == "loop"]
        assert calls, module
