"""Tiny CPU dry-run of every stage that exists, on scikit-learn's bundled digits (offline).

    make dryrun     # = python -m launch.run --config launch/configs/tiny.py
    python -m launch.run --config launch/configs/tiny.py --dry_run
    python -m launch.run --config launch/configs/tiny.py:prepare \
        --config.prepare.datasets.digits.image_size=16
    # as XManager work units
    python -m launch.xm_launch --config launch/configs/tiny.py --workdir ./workdir

Each stage group starts from its module's `default_config()` (the complete key set), is adjusted
here, and the whole config is locked, so `--config.<stage>.<key>=...` cannot invent keys.
Adding a stage = import its module and add one entry to `groups` below.
"""

from __future__ import annotations

import ml_collections

from eval import evaluate, probe
from launch import recipe
from launch.configs import common
from pipelines import prepare
from trainer import distill, finetune, lit, pretrain

# The recipe card's marks (launch/recipe.py); unmarked values set here are this config's ("user").
RECIPE = {
    "pretrain.loss": recipe.mark("paper", True, "sigmoid cross-entropy, as ViT-22B pretrains"),
    "pretrain.model.variant": recipe.mark(
        "user", False, "mu: the ViT-22B block at width 64, for CPU runs"
    ),
    "distill.runs.*.temperature": recipe.mark("reference", True, "big_vision distill configs"),
}


def pretrain_config() -> ml_collections.ConfigDict:
    """mu/4 (the ViT-22B block at width 64) on 32 px digits, on a 4 x 2 (data x model) mesh."""
    c = pretrain.default_config()
    c.model.variant = "mu/4"
    c.model.head_bias_init = -2.2  # ~log(1/9): sigmoid outputs start at the 10-class prior
    c.data.dataset = "digits"
    c.data.image_size = 32
    # 8x8 digits upscaled: Inception crops cut strokes away and flips change the digit.
    c.data.augment.inception_crop = False
    c.data.augment.flip = False
    c.batch_size = 64
    c.eval_batch_size = 64
    c.steps = 200
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.optim.cooldown_steps = 40
    c.mesh.data = 4
    c.mesh.model = 2
    c.runtime.log_every = 1  # MFU, loss, ... for every step
    c.evals.val.every = 100
    # The pretrained model scored in another label space (digit pairs) through a label map.
    c.evals.pairs = ml_collections.ConfigDict(
        dict(
            type="label_map",
            split="val",
            map="digits_pairs",
            labels="source",
            reduce="max",
            every=100,
        )
    )
    # big_vision-style few-shot on the pre-logits during pretraining
    # (trainer/evaluators/fewshot.py).
    c.evals.fewshot = ml_collections.ConfigDict(
        dict(type="fewshot", train_split="train", split="val", every=100)
    )
    c.checkpoint_every = 50
    return c


def finetune_run(image_size: int) -> ml_collections.ConfigDict:
    """Fine-tune the digits pretrain at `image_size` px (32 = its own resolution; 48 resizes the
    position embedding from 8x8 to 12x12 patches) with big_vision's SGD recipe, scaled down."""
    c = finetune.default_config()
    c.init_from = "pretrain"
    c.data.dataset = "digits"
    c.data.image_size = image_size
    c.data.augment.inception_crop = (
        False  # as in pretraining: crops cut strokes, flips change digits
    )
    c.data.augment.flip = False
    c.batch_size = c.eval_batch_size = 64
    c.steps = 60
    c.optim.lr = 0.01
    c.optim.warmup_steps = 5
    c.mesh.data, c.mesh.model = 4, 2
    c.checkpoint_every = 30
    c.evals.val.every = 30
    c.runtime.log_every = 10
    return c


def distill_run() -> ml_collections.ConfigDict:
    """A small sequential-block student (the paper's students are sequential B/16 and L/16)
    distilled from the digits pretrain; consistent teaching: one crop/mixup for both models."""
    c = distill.default_config()
    c.teacher = "pretrain"
    c.model.variant = "mu/4"
    c.model.update(
        dict(block="sequential", qk_norm=False, use_bias=True, norm="layernorm", head="gap")
    )
    c.data.dataset = "digits"
    c.data.image_size = 32
    c.data.augment.inception_crop = False
    c.data.augment.flip = False
    c.data.augment.mixup_alpha = 0.0  # the recipe of benchmarks/distill.py's claim on digits
    c.batch_size = c.eval_batch_size = 64
    c.steps = 100  # the claim needs ~600 (benchmarks/RESULTS.md); a dry run checks the path
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.mesh.data, c.mesh.model = 4, 2
    c.checkpoint_every = 50
    c.evals.val.every = c.evals.agree.every = 50
    c.runtime.log_every = 10
    return c


DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def lit_config() -> ml_collections.ConfigDict:
    """LiT on the digits captions: the pretrained mu/4 locked, a 1-layer mu text tower trained."""
    c = lit.default_config()
    c.image_from = "pretrain"
    c.model.variant = "mu"
    c.model.depth = 1
    c.data.dataset = "digits"
    c.data.image_size = 32
    c.batch_size = c.eval_batch_size = 64
    c.steps = 150
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.mesh.data, c.mesh.model = 4, 2
    c.checkpoint_every = 50
    c.evals.zeroshot.every = c.evals.retrieval.every = 75
    c.evals.zeroshot.class_names = DIGIT_WORDS  # the prompts name the classes in words
    c.runtime.log_every = 10
    return c


def probe_config() -> ml_collections.ConfigDict:
    """Linear probe + few-shot on the digits pretrain's frozen pre-logits."""
    c = probe.default_config()
    c.batch_size = 128
    c.mesh.data, c.mesh.model = 4, 2
    return c


def evaluate_config() -> ml_collections.ConfigDict:
    """Scores every model of the run: val/test accuracy, calibration, OOD and model-vs-human through
    the digit-pairs label map, and fairness over the pixel-derived `heavy_ink` attribute."""
    c = evaluate.default_config()  # evals: val/test accuracy + calibration on test; models=() = all
    c.dataset = "digits"
    c.batch_size = 64
    c.mesh.data, c.mesh.model = 4, 2
    c.evals.pairs = ml_collections.ConfigDict(
        dict(type="ood", split="test", map="digits_pairs", labels="source")
    )
    c.evals.fairness = ml_collections.ConfigDict(
        dict(
            type="fairness",
            split="test",
            fit_split="val",
            attribute="heavy_ink",
            positive=("0", "2", "4", "6", "8"),
        )
    )
    c.evals.mvh = ml_collections.ConfigDict(
        dict(
            type="model_vs_human",
            split="test",
            map="digits_pairs",
            labels="source",
            experiment="digits-pairs",
        )
    )
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`python -m launch.run --config launch/configs/tiny.py[:STAGE,...]` (ARG keeps only those
    stages)."""
    groups = {
        # digits at 32 px, 1 in-process FnApiRunner worker (pipelines/prepare.py defaults)
        "prepare": prepare.default_config(),
        "pretrain": pretrain_config(),
        "finetune": finetune.group(),
        "distill": distill.group(),
        "lit": lit_config(),
        "probe": probe_config(),
        "evaluate": evaluate_config(),
    }
    groups["finetune"].runs.r48 = finetune_run(48)
    groups["finetune"].runs.r32 = finetune_run(32)
    groups["distill"].runs.mu_seq = distill_run()
    xm = common.xm_group({name: common.resources(cpu=2, ram_gib=8) for name in groups})
    return common.build(groups, xm, arg, RECIPE)
