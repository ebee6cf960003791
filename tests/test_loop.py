"""The loop's Task seams, with a second Task that is not pretraining: a student regressing the
logits of a frozen teacher on digits, built only from trainer/task.py + trainer/loop.py."""

import ast
import inspect
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from trainer import checkpoint, loop, stage_config
from trainer.models import vit
from trainer.task import Frozen, Task, vit_init

REPO = Path(__file__).resolve().parents[1]


def _state_leaves(step_dir: Path) -> dict[tuple, tuple]:
    """{key path: global shape} of a checkpoint's `state` item, from Orbax's metadata."""
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.metadata((step_dir / "state").absolute()).item_metadata.tree
    return {
        tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_a_frozen_teacher_task_trains_through_the_loop(prepared_digits, tmp_path):
    teacher_cfg = vit.make_config(
        "mu/4", image_size=32, num_classes=10, depth=1, head_zeroinit=False
    )
    student_cfg = vit.make_config(
        "mu/4",
        image_size=32,
        num_classes=10,
        depth=1,
        width=32,
        num_heads=2,
        mlp_dim=64,
        head_zeroinit=False,
    )
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
        logits, _ = student.apply(
            {"params": params}, batch["image"], train=True, rngs={"dropout": rng}
        )
        return jnp.mean(jnp.square(logits - target)), {"target_std": jnp.std(target)}

    task = Task(
        name="toy",
        init=vit_init(student),
        loss=regression,
        predict={"logits": lambda p, f, b: student.apply({"params": p}, b["image"])[0]},
        frozen=Frozen(vit.abstract_params(teacher_cfg), load),
        model_spec=student_cfg.to_json(),
    )

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
    assert [r["step"] for r in rows if "val/top1" in r] == [6, 12] and "val/top1" in result[
        "metrics"
    ]

    # Frozen params: loaded once, never donated (still readable) nor changed by training.
    (frozen,) = loaded
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(frozen), saved)

    # ... and neither optimised nor checkpointed: the state holds the student alone.
    student_shapes = sorted(
        tuple(x.shape)
        for x in jax.tree_util.tree_leaves(nn.unbox(vit.abstract_params(student_cfg)))
    )
    leaves = _state_leaves(out / "checkpoints" / "12")
    assert sorted(s for k, s in leaves.items() if k[0] == "params") == student_shapes
    moments = sorted(s for k, s in leaves.items() if k[0] == "opt_state" and s)  # Adam's mu and nu
    assert moments == sorted(student_shapes * 2)
    exported = checkpoint.load_params(out / "params")
    assert jax.tree_util.tree_structure(exported) == jax.tree_util.tree_structure(
        nn.unbox(vit.abstract_params(student_cfg))
    )
    assert checkpoint.read_model_json(out / "model.json")["overrides"]["width"] == 32


STEPPER = "trainer/step.py"  # the one module that steps an optimizer (trainer/loop.py drives it)
CODE = ("data", "pipelines", "trainer", "eval", "launch")


def _stage_modules() -> dict[str, Path]:
    """The module of every stage in launch/dag.py's table, so a new stage is covered too."""
    from launch import dag

    return {
        stage.name: REPO / (stage.target.partition(":")[0].replace(".", "/") + ".py")
        for stage in dag.STAGES
    }


def _optimizer_steps(tree: ast.AST) -> list[int]:
    """Lines stepping an optax optimizer: `tx.update(grads, state[, params])` (not a dict's or
    jax.config's update) or `optax.apply_updates`."""
    calls = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    ]
    return [
        n.lineno
        for n in calls
        if n.func.attr == "apply_updates"
        or n.func.attr == "update"
        and len(n.args) in (2, 3)
        and not isinstance(n.args[0], ast.Constant)
    ]


def _optimizers_built(tree: ast.AST) -> list[str]:
    """`optax.<name>` references that build a GradientTransformation (adam, chain, lbfgs, ...)."""

    def builds(name: str) -> bool:
        obj = getattr(optax, name, None)
        if isinstance(obj, type):
            return issubclass(obj, optax.GradientTransformation)
        try:
            returns = inspect.signature(obj).return_annotation
        except (TypeError, ValueError):
            return False
        return isinstance(returns, type) and issubclass(returns, optax.GradientTransformation)

    return [
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id == "optax"
        and builds(n.attr)
    ]


def _gradients_in_loops(tree: ast.AST) -> list[int]:
    """Lines taking a gradient (jax.grad / jax.value_and_grad) inside a Python for/while."""
    loops = [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))]
    return [
        n.lineno
        for body in loops
        for n in ast.walk(body)
        if isinstance(n, ast.Attribute) and n.attr in ("grad", "value_and_grad")
    ]


def step_loops(source: str) -> list:
    """What makes a module hold a step loop of its own: optimizer steps, optimizers built, gradients
    taken inside a Python loop (empty for a module that holds none)."""
    tree = ast.parse(source)
    return _optimizer_steps(tree) + _optimizers_built(tree) + _gradients_in_loops(tree)


def test_pretrain_is_a_task_and_no_stage_module_holds_a_loop():
    """The training loop exists once (trainer/loop.py driving trainer/step.py). Every registered
    stage's module neither builds nor steps an optimizer nor takes gradients in a Python loop (the
    probe solves its convex problem with SciPy's L-BFGS); the training stages (trainer/) run
    through loop.run; pretrain (a Task and nothing else) has no loop at all. No other code module
    steps an optimizer either."""
    modules = _stage_modules()
    stages = {"prepare", "pretrain", "finetune", "distill", "lit", "probe", "evaluate"}
    assert set(modules) >= stages
    for name, path in modules.items():
        source = path.read_text()
        assert not step_loops(source), (name, step_loops(source))
        calls = [
            n
            for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Attribute)
            and n.attr == "run"
            and isinstance(n.value, ast.Name)
            and n.value.id == "loop"
        ]
        assert bool(calls) == (path.parent == REPO / "trainer"), name  # training stages: loop.run
    for module in ("trainer/pretrain.py",):
        tree = ast.parse((REPO / module).read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.While, ast.For))], module
        calls = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute)
            and n.attr == "run"
            and isinstance(n.value, ast.Name)
            and n.value.id == "loop"
        ]
        assert calls, module
    others = [
        p
        for package in CODE
        for p in sorted((REPO / package).rglob("*.py"))
        if p.relative_to(REPO).as_posix() != STEPPER
    ]
    assert not {
        p.relative_to(REPO).as_posix(): _optimizer_steps(ast.parse(p.read_text()))
        for p in others
        if _optimizer_steps(ast.parse(p.read_text()))
    }
    assert _optimizer_steps(ast.parse((REPO / STEPPER).read_text()))  # the check sees a real one


def test_the_step_loop_check_flags_a_hand_written_training_loop():
    """What the check above would say of the probe's former Adam loop (a vmapped head stepped
    `steps` times) and of a bare gradient-descent loop; a loop over chunks or solves passes."""
    adam = """
def step(params, opt_state, x, y):
    tx = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(schedule))
    updates, opt_state = tx.update(jax.grad(loss)(params, x, y), opt_state)
    return optax.apply_updates(params, updates), opt_state
for _ in range(steps):
    params, opt_state = step(params, opt_state, x, y)
"""
    descent = """
while not done:
    params = params - lr * jax.grad(loss)(params)
"""
    fine = """
config.update("jax_enable_x64", True)
metrics.update(values)
for chunk in chunks:
    total += objective(theta, chunk)
result = scipy.optimize.minimize(jax.value_and_grad(loss), theta, method="L-BFGS-B")
"""
    # tx.update, optax.apply_updates, optax.chain, optax.scale_by_adam, optax.scale_by_schedule
    assert len(step_loops(adam)) == 5
    assert step_loops(descent) and not step_loops(fine)
