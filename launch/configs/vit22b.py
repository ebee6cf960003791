"""ViT-22B/14 on ImageNet/JFT-style TFDS data on a TPU v4 pod slice (docs/DESIGN.md §4).

    python -m launch.xm_launch --config launch/configs/vit22b.py --xm_target=vertex --xm_dry_run \
        --workdir /gcs/YOUR_BUCKET/vit22b
    python -m launch.xm_launch --config launch/configs/vit22b.py --xm_target=gke \
        --workdir /mnt/shared/vit22b --config.xm.image=us-docker.pkg.dev/PROJECT/REPO/vit22b:TAG \
        --config.prepare.datasets.imagenet2012.tfds_data_dir=/mnt/shared/tensorflow_datasets

Data: a *local* TFDS data dir (prepare never downloads); ImageNet-2012 by default, with a 1%
`minival` carved from train for model selection (big_vision convention). JFT is not public:
point `tfds_name`/`tfds_data_dir` (or a `folder` source) at any JFT-style multi-label dataset.
The workdir must be a POSIX path every job sees (GCS FUSE on Vertex, a shared volume on GKE).
"""

from __future__ import annotations

import ml_collections

from eval import evaluate, probe
from launch import recipe
from launch.configs import common
from pipelines import prepare
from trainer import distill, finetune, optim, pretrain

# The recipe card's marks (launch/recipe.py): where each value comes from, and whether that is
# confirmed at the source (docs/DESIGN.md §4). Values set below without a mark are the config's
# choice ("user"); unset ones the stage's defaults. Keep every "ASSUMED" value here.
_BV_TRANSFER = "big_vision's ImageNet transfer recipe, assumed for the 22B fine-tune"
RECIPE = {
    "pretrain.model.variant": recipe.mark(
        "paper", True, "ViT-22B/14: width 6144, depth 48, MLP 24576, 48 heads"
    ),
    "pretrain.model.matmul": recipe.mark("paper", True, "asynchronous parallel linear operations"),
    "pretrain.loss": recipe.mark(
        "paper", True, "sigmoid cross-entropy on flattened multi-label targets"
    ),
    "pretrain.batch_size": recipe.mark(
        "paper", False, "65,536 as we recall it; not found in the text"
    ),
    "pretrain.steps": recipe.mark(
        "paper", False, "177k steps (~3 epochs of JFT-4B) as we recall it"
    ),
    "pretrain.data.image_size": recipe.mark("paper", False, "224 px pretraining as we recall it"),
    "pretrain.optim.optimizer": recipe.mark(
        "reference", True, "big_vision ViT-G/14: Adafactor variant"
    ),
    "pretrain.optim.schedule": recipe.mark("paper", True, "reciprocal square-root schedule"),
    "pretrain.optim.timescale": recipe.mark(
        "reference", True, "big_vision ViT-G/14 rsqrt timescale"
    ),
    "pretrain.optim.lr": recipe.mark("paper", False, "peak 1e-3 as we recall it (ViT-G used 8e-4)"),
    "pretrain.optim.warmup_steps": recipe.mark("paper", False, "10k warmup steps as we recall it"),
    "pretrain.optim.cooldown_steps": recipe.mark(
        "reference", False, "ViT-G's 50k-step linear cooldown, assumed"
    ),
    "pretrain.optim.grad_clip_norm": recipe.mark(
        "reference", True, "big_vision ViT-G/14: global norm 1.0"
    ),
    "pretrain.optim.wd_rules": recipe.mark(
        "paper", False, "higher head weight decay (paper); 3.0 / 0.03 unconfirmed"
    ),
    "finetune.runs.*.batch_size": recipe.mark("reference", False, _BV_TRANSFER),
    "finetune.runs.*.steps": recipe.mark("reference", False, _BV_TRANSFER),
    "finetune.runs.*.optim.optimizer": recipe.mark("reference", False, _BV_TRANSFER),
    "finetune.runs.*.optim.lr": recipe.mark("reference", False, _BV_TRANSFER),
    "finetune.runs.*.optim.schedule": recipe.mark("reference", False, _BV_TRANSFER),
    "finetune.runs.*.optim.warmup_steps": recipe.mark("reference", False, _BV_TRANSFER),
    "finetune.runs.*.optim.grad_clip_norm": recipe.mark("reference", False, _BV_TRANSFER),
    "distill.runs.*.model.variant": recipe.mark(
        "paper", True, "the paper's students: ViT-B/16 and ViT-L/16"
    ),
    "distill.runs.*.teacher": recipe.mark("user", False, "ASSUMED: the 224 px fine-tune teaches"),
    "distill.runs.*.data.augment.mixup_alpha": recipe.mark(
        "reference", True, "big_vision distill configs (p=1)"
    ),
    "distill.runs.*.temperature": recipe.mark("reference", True, "big_vision distill configs"),
    "distill.runs.*.batch_size": recipe.mark(
        "reference", False, "big_vision bit_i1k distill; ASSUMED for ViT students"
    ),
    "distill.runs.*.epochs": recipe.mark(
        "reference", False, "big_vision's 'patient' middle ground; ASSUMED"
    ),
    "distill.runs.*.optim.optimizer": recipe.mark("user", False, "ASSUMED"),
    "distill.runs.*.optim.lr": recipe.mark("user", False, "ASSUMED"),
    "distill.runs.*.optim.wd": recipe.mark("user", False, "ASSUMED"),
    "distill.runs.*.mesh.model": recipe.mark(
        "user", False, "ASSUMED: 4 divides B's 12, L's 16 and 22B's 48 heads"
    ),
}

# One TPU v4 pod slice of 1024 chips (8x8x16 torus, 256 hosts); our choice of size, override
# with --config.xm.resources.pretrain.tpu_topology=4x4x8 etc.
PRETRAIN_TPU = common.resources(tpu_type="v4", tpu_topology="8x8x16")


def pretrain_config() -> ml_collections.ConfigDict:
    """ViT-22B/14 at 224 px (256 patches): parallel block, QK-norm, bias-free RMS LayerNorms, MAP
    head, sigmoid cross-entropy; Adafactor with the head/body weight decay of trainer/optim.py."""
    c = pretrain.default_config()
    c.model.variant = "22B/14"
    c.model.dtype = "bfloat16"  # compute; parameters stay float32
    c.model.matmul = "collective"  # the paper's asynchronous parallel linear operations
    c.model.remat = (
        "dots_no_batch"  # our choice: with 4 microbatches (below) it fits 32 GiB v4 chips
    )
    c.model.head_bias_init = -6.9  # log(1/1000): sigmoid outputs start at the class prior
    c.data.dataset = "imagenet2012"
    c.evals.val.split = "minival"
    # big_vision's in-training few-shot on the pre-logits (docs/DESIGN.md §7).
    c.evals.fewshot = ml_collections.ConfigDict(
        dict(type="fewshot", train_split="fewshot_train", split="minival", every=5_000)
    )
    c.data.image_size = 224
    c.runtime.worker_count = 16
    c.loss = "sigmoid_xent"
    c.optim = optim.vit22b_config()
    # The paper's JFT schedule (batch 65,536, 177k steps ~ 3 epochs of JFT-4B) as we recall it;
    # on ImageNet-1k prefer --config.pretrain.steps=None --config.pretrain.epochs=90.
    c.batch_size = 65_536
    c.eval_batch_size = 8_192
    c.steps = 177_000
    # 16-way model parallelism: 48 heads, width 6144 and MLP 24576 all divide by 16 (our choice).
    c.mesh.model = 16
    c.mesh.data = -1
    # Fits v4:8x8x16 (1024 megacore chips, 32 GiB each; mesh data 64 x model 16) only with gradient
    # accumulation: AOT-compiled by libtpu (benchmarks/aot.py,
    # RESULTS "ViT-22B compiled for TPU pods"), per-device temps with remat dots_no_batch were
    # 80.3 GiB at 1 microbatch (1024 images per data row: no-go), 30.7 GiB with remat full (no-go),
    # 23.5 GiB at 4 microbatches (24.3 GiB live <= 28.8 usable: go, xla and collective alike) and
    # 12.3 GiB at 8. 4 keeps the FSDP weight gathers per step lowest; smaller slices need more
    # (preflight's memory row says so).
    c.microbatches = 4
    c.runtime.log_every = 50
    c.evals.val.every = 5_000
    c.checkpoint_every = 1_000
    c.runtime.keep_checkpoints = 3
    c.runtime.distributed.auto = (
        True  # TPU pod slices: jax.distributed.initialize() detects the cluster
    )
    return c


def finetune_run(image_size: int) -> ml_collections.ConfigDict:
    """Full fine-tuning of the 22B pretrain on ImageNet-1k at `image_size` px (the paper fine-tunes
    at several resolutions; which ones, and the recipe, are not in the seed: big_vision's ImageNet
    transfer recipe is assumed — SGD momentum 0.9, lr 0.03, cosine, 500 warmup steps, clip 1.0,
    no weight decay, batch 512, 20k steps — with label smoothing 0.1 as our choice)."""
    c = finetune.default_config()
    c.init_from = "pretrain"
    c.data.dataset = "imagenet2012"
    c.data.image_size = image_size
    c.evals.val.split = "val"
    c.evals.val.every = 2_000
    c.model.dtype = "bfloat16"
    c.model.matmul = "collective"
    c.model.remat = "dots_no_batch"
    c.mesh.model = 16
    c.checkpoint_every = 1_000
    c.runtime.keep_checkpoints = 3
    c.runtime.log_every = 50
    c.runtime.worker_count = 16
    c.runtime.distributed.auto = True
    return c


def probe_config() -> ml_collections.ConfigDict:
    """Linear probe (the paper's 89.5% ImageNet headline is this kind of number) + few-shot on the
    frozen 22B pre-logits; the l2 grid is our choice (around 1 / #train examples)."""
    c = probe.default_config()
    c.dataset = "imagenet2012"
    c.batch_size = 4096
    c.mesh.data, c.mesh.model = -1, 16
    c.linear.eval_splits = ("val",)
    c.linear.l2s = (1e-7, 1e-6, 1e-5, 1e-4)
    c.fewshot.train_split, c.fewshot.split = "train", "val"
    c.runtime.worker_count = 16
    return c


def evaluate_config() -> ml_collections.ConfigDict:
    """The paper's evaluation suite on every model of the run: ImageNet val / ReaL / v2, OOD on -R,
    -A and ObjectNet through label maps (ObjectNet's map is the user's file), model-vs-human on the
    cue-conflict stimuli, calibration. CelebA fairness needs a CelebA-trained model: add
    evals.celeba = dict(type="fairness", dataset="celeb_a", ..., models=("finetune/celeba",))."""
    c = evaluate.default_config()
    c.dataset = "imagenet2012"
    c.batch_size = 4096
    c.mesh.data, c.mesh.model = -1, 16
    c.runtime.worker_count = 16
    c.evals = ml_collections.ConfigDict(
        {
            "val": dict(type="accuracy", split="val"),
            "real": dict(type="accuracy", dataset="imagenet2012_real", split="test"),
            "v2": dict(type="accuracy", dataset="imagenet_v2", split="test"),
            "r": dict(type="ood", dataset="imagenet_r", split="test", map="imagenet_r"),
            "a": dict(type="ood", dataset="imagenet_a", split="test", map="imagenet_a"),
            "objectnet": dict(
                type="ood",
                dataset="objectnet",
                split="test",
                map="/gcs/YOUR_BUCKET/label_maps/objectnet.json",
                border=2,
            ),
            "cue_conflict": dict(
                type="model_vs_human",
                dataset="cue_conflict",
                split="test",
                experiment="cue-conflict",
                human_data="/gcs/YOUR_BUCKET/model-vs-human/raw-data",
            ),
            "calibration": dict(type="calibration", split="val"),
        }
    )
    c.report.title = "ViT-22B run report"
    return c


def distill_run(variant: str) -> ml_collections.ConfigDict:
    """A B/16 or L/16 student (classic sequential blocks, the paper's) distilled from the 22B
    fine-tune. Schedule values are not in the seed: ASSUMED ones marked."""
    c = distill.default_config()
    c.teacher = "finetune/i224"  # ASSUMED: the 224 px fine-tune teaches; same resolution, no resize
    c.model.variant = variant
    c.model.dtype = "bfloat16"
    c.data.dataset, c.data.image_size = "imagenet2012", 224
    c.data.augment.mixup_alpha = 1.0  # big_vision distill (p=1); Inception crop + flip = defaults
    c.temperature = 1.0  # big_vision distill configs
    c.evals.val.split = c.evals.agree.split = "minival"
    c.evals.val.every = c.evals.agree.every = 5_000
    c.batch_size = c.eval_batch_size = (
        4096  # big_vision's bit_i1k distill; ASSUMED for ViT students
    )
    c.steps = None
    c.epochs = 1200.0  # big_vision's "patient" middle ground; ASSUMED
    c.optim.optimizer, c.optim.lr, c.optim.wd = "adamw", 1e-3, 0.05  # ASSUMED
    c.optim.schedule, c.optim.warmup_steps, c.optim.grad_clip_norm = "cosine", 5_000, 1.0
    c.optim.adamw.mu_dtype = "bfloat16"  # big_vision distill
    c.mesh.data, c.mesh.model = -1, 4  # ASSUMED: 4 divides B's 12, L's 16 and 22B's 48 heads
    c.checkpoint_every = 1_000
    c.runtime.log_every, c.runtime.worker_count, c.runtime.keep_checkpoints = 50, 16, 3
    c.runtime.distributed.auto = True
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`python -m launch.xm_launch --config launch/configs/vit22b.py[:STAGE,...] \
    --xm_target=vertex`."""
    prep = prepare.default_config()
    prep.datasets = ml_collections.ConfigDict(
        {
            "imagenet2012": prepare.dataset_config(
                source="tfds",
                tfds_name="imagenet2012",
                tfds_data_dir="/gcs/YOUR_BUCKET/tensorflow_datasets",
                splits={
                    "train": "train[:99%]",
                    "minival": "train[99%:]",
                    "val": "validation",
                    # ~128 images per class: enough for 25-shot (minival has ~13 per class)
                    "fewshot_train": "train[:10%]",
                },
                # Shorter side stored at 384 px (downscale only): room for 224 px inception crops
                # in pretraining and higher-resolution fine-tuning without re-preparing.
                image_size=384,
                records_per_shard=4096,
            ),
        }
    )
    # The evaluation suite's datasets (local TFDS builds / folders on the bucket; never downloaded).
    tfds_dir = prep.datasets.imagenet2012.tfds_data_dir

    def tfds_test(name: str, split: str) -> ml_collections.ConfigDict:
        return prepare.dataset_config(
            source="tfds",
            tfds_name=name,
            tfds_data_dir=tfds_dir,
            splits={"test": split},
            image_size=384,
            records_per_shard=4096,
        )

    prep.datasets.update(
        {
            "imagenet2012_real": tfds_test("imagenet2012_real", "validation"),
            "imagenet_v2": tfds_test("imagenet_v2", "test"),
            "imagenet_r": tfds_test("imagenet_r", "test"),
            "imagenet_a": tfds_test("imagenet_a", "test"),
            "objectnet": prepare.dataset_config(
                source="folder",
                root="/gcs/YOUR_BUCKET/objectnet/images",
                splits={"test": ""},
                image_size=384,
            ),
            "cue_conflict": prepare.dataset_config(
                source="cue_conflict",
                root="/gcs/YOUR_BUCKET/model-vs-human/cue-conflict",
                splits={"test": ""},
                image_size=224,
                lossless=True,
            ),
        }
    )
    prep.direct_num_workers = 16
    prep.direct_running_mode = "multi_processing"
    groups = {
        "prepare": prep,
        "pretrain": pretrain_config(),
        "finetune": finetune.group(),
        "distill": distill.group(),
        "probe": probe_config(),
        "evaluate": evaluate_config(),
    }
    groups["distill"].runs.b16 = distill_run("B/16")
    groups["distill"].runs.l16 = distill_run("L/16")
    groups["finetune"].runs.i224 = finetune_run(224)
    groups["finetune"].runs.i518 = finetune_run(
        518
    )  # assumed: 37x37 patches of 14 px (ViT-g/14 fine-tunes at 518)
    xm = common.xm_group(
        {
            "prepare": common.resources(cpu=32, ram_gib=128),
            "pretrain": PRETRAIN_TPU,
            "finetune": PRETRAIN_TPU,  # the same slice: 22B needs the pretrain's model parallelism
            "distill": PRETRAIN_TPU,  # the teacher is 22B; a smaller slice may do (not measured)
            "probe": PRETRAIN_TPU,
            "evaluate": PRETRAIN_TPU,
        }
    )
    return common.build(groups, xm, arg, RECIPE)
