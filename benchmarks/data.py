"""Data benchmarks: prepare throughput, and Grain vs tf.data loader throughput, in one run.

    python -m benchmarks.data                 # defaults finish in < 3 min on 2 cores
    python -m benchmarks.data --num_images 4000 --batches 40 --workers 1,2,4

1. prepare: the script writes `--num_images` 224x224 JPEGs (synthetic photo-like content) into
   an image folder and runs the real Beam job (`pipelines.prepare`, FnApiRunner) on them:
   decode + validate + re-encode (q95) + ArrayRecord + manifest. Reported per wall second and
   per CPU second (= per core actually used, this process and its children).
2. loader: the same ArrayRecord files feed (a) our Grain train pipeline (`data.loader`, host
   batches from `.iterator`, i.e. before device transfer) and (b) the equivalent tf.data
   pipeline: a Python generator over the ArrayRecord files in shuffled order (array_record has
   no tf.data source; TFDS's ArrayRecord adapter raises for as_dataset) -> parse_single_example ->
   sample_distorted_bounding_box + decode_and_crop_jpeg -> resize -> flip -> batch. Both yield
   uint8 [B, S, S, 3] crops + multi-hot labels. "workers" = parallel decoders: Grain decode
   threads in the training process (`read_threads`; the JPEG decoder and OpenCV release the GIL)
   vs tf.data parallel map calls (its private thread pool gets one more thread for the
   generator); the "procs" columns run Grain with that many worker processes of one thread each
   (`worker_count`) instead. Each pipeline runs alone; the best of `--rounds` windows is kept.
   img/cpu-s divides by the CPU time of this process and its children (Grain workers) over the
   window: a per-core rate that other jobs on a shared machine disturb less than wall time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from trainer.markdown import table


def _cpu_seconds() -> float:
    """User+system CPU seconds of this process and its reaped children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def make_jpegs(root: Path, n: int, size: int = 224, classes: int = 10, seed: int = 0) -> int:
    """Photo-like synthetic JPEGs (smooth fields, shapes, sensor noise): ~30 KB at 224^2 q95."""
    import cv2
    import simplejpeg

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        low = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
        img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
        for _ in range(4):
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            p = rng.integers(0, size, 4)
            cv2.rectangle(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), c, -1)
            cv2.circle(img, (int(p[1]), int(p[2])), int(p[3]) // 4, c, 2)
        img = np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0, 255).astype(
            np.uint8
        )
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        data = simplejpeg.encode_jpeg(img, quality=95)
        (d / f"img{i:06d}.jpg").write_bytes(data)
        total += len(data)
    return total


def bench_prepare(src: Path, out: Path, workers: int, mode: str) -> dict:
    import ml_collections

    from pipelines import prepare

    cfg = prepare.default_config()
    cfg.datasets = ml_collections.ConfigDict(
        {
            "bench": prepare.dataset_config(
                source="folder", root=str(src), image_size=0, records_per_shard=1024
            )
        }
    )
    cfg.direct_num_workers = workers
    cfg.direct_running_mode = mode
    t0, c0 = time.perf_counter(), _cpu_seconds()
    result = prepare.prepare(cfg, out)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0  # Beam's SDK workers are reaped
    n = result.counters["accepted"]
    return {"n": n, "wall": wall, "cpu": cpu, "per_s": n / wall, "per_cpu_s": n / cpu}


def bench_element(src: Path, n: int = 500) -> tuple[int, float]:
    """The per-image work alone (decode, validate, encode, serialize), no Beam: (n, images/s)."""
    from data import images, records

    files = sorted(src.rglob("*.jpg"))[:n]
    blobs = [f.read_bytes() for f in files]
    t0 = time.perf_counter()
    for i, b in enumerate(blobs):
        img = images.decode_rgb(b)
        records.encode(
            records.Record(image=images.encode_jpeg(img, 95), label=(i % 10,), id=str(i))
        )
    return len(blobs), len(blobs) / (time.perf_counter() - t0)


def _tree_cpu_seconds() -> float:
    """CPU seconds of this process and its live children (Grain workers, Beam SDK workers)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _time_batches(it, warmup: int, batches: int, batch_size: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) over `batches` after `warmup`."""
    for _ in range(warmup):
        next(it)
    t0, c0 = time.perf_counter(), _tree_cpu_seconds()
    for _ in range(batches):
        next(it)
    n = batches * batch_size
    wall, cpu = time.perf_counter() - t0, _tree_cpu_seconds() - c0
    # CPU time ticks in 10 ms: a tiny window (smoke runs) can read 0
    return n / wall, n / cpu if cpu > 0 else float("nan")


def grain_iterator(
    split_dir: Path, workers: int, batch_size: int, size: int, *, processes: bool = False
):
    """Our train pipeline's host batches (returns (iterator, close)): `workers` decode threads in
    this process, or with `processes` that many Grain worker processes of one thread each."""
    import jax

    from data import loader
    from trainer import sharding

    bsh = sharding.batch_sharding(sharding.make_mesh(devices=jax.devices()[:1]))
    tl = loader.train_loader(
        split_dir,
        global_batch_size=batch_size,
        image_size=size,
        seed=0,
        sharding=bsh,
        worker_count=workers if processes else 0,
        read_threads=1 if processes else workers,
    )
    return tl.iterator, tl.close


def grain_processes_iterator(split_dir: Path, workers: int, batch_size: int, size: int):
    return grain_iterator(split_dir, workers, batch_size, size, processes=True)


def tfdata_iterator(split_dir: Path, workers: int, batch_size: int, size: int):
    """The equivalent tf.data pipeline over the same ArrayRecord files
    (returns (iterator, close))."""
    import tensorflow as tf

    from data import manifest as manifest_lib
    from grain.sources import ArrayRecordDataSource

    m = manifest_lib.validate(split_dir)
    source = ArrayRecordDataSource(m.shard_paths(split_dir))
    num_classes = m.num_classes

    def records():  # global shuffle, as Grain's: a fresh permutation per epoch
        rng = np.random.default_rng(0)
        while True:
            for i in rng.permutation(len(source)):
                yield source[int(i)]

    def parse(raw):
        f = tf.io.parse_single_example(
            raw,
            {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.VarLenFeature(tf.int64)},
        )
        shape = tf.image.extract_jpeg_shape(f["image"])
        begin, crop, _ = tf.image.sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.zeros([0, 0, 4]),
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        y, x, _ = tf.unstack(begin)
        h, w, _ = tf.unstack(crop)
        img = tf.image.decode_and_crop_jpeg(f["image"], tf.stack([y, x, h, w]), channels=3)
        img = tf.cast(tf.image.resize(img, (size, size)), tf.uint8)
        img = tf.image.random_flip_left_right(img)
        label = f["label"].values
        labels = tf.reduce_max(tf.one_hot(label, num_classes), axis=0)
        return {"image": img, "labels": labels, "label": tf.cast(label[0], tf.int32)}

    opts = tf.data.Options()
    # `workers` parallel map calls, plus one thread for the Python generator (it holds a
    # pool thread while it runs); Grain's main process likewise only reads and forwards.
    opts.threading.private_threadpool_size = workers + 1
    opts.threading.max_intra_op_parallelism = 1
    ds = (
        tf.data.Dataset.from_generator(records, output_signature=tf.TensorSpec([], tf.string))
        .map(parse, num_parallel_calls=workers, deterministic=True)
        .batch(batch_size, drop_remainder=True)
        .prefetch(2)
        .with_options(opts)
    )
    return ds.as_numpy_iterator(), lambda: None


def bench_loader(
    make,
    split_dir: Path,
    workers: int,
    batch_size: int,
    size: int,
    warmup: int,
    batches: int,
    rounds: int,
) -> tuple[float, float]:
    """Best of `rounds` timed windows (the least disturbed by whatever else runs on the machine)
    for one pipeline, alone: (images per wall second, images per CPU second of the process tree)."""
    it, close = make(split_dir, workers, batch_size, size)
    try:
        return max(_time_batches(it, warmup, batches, batch_size) for _ in range(rounds))
    finally:
        close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num_images", type=int, default=2048)
    ap.add_argument("--image_size", type=int, default=224, help="loader output size")
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=12, help="timed batches per window")
    ap.add_argument("--warmup", type=int, default=4, help="untimed batches before each window")
    ap.add_argument("--rounds", type=int, default=5, help="timed windows per pipeline (best kept)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--workdir", default="", help="default: a temp dir, removed afterwards")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    workers = [int(w) for w in args.workers.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    try:
        print(
            f"# data benchmark  {datetime.date.today()}  {platform.machine()}  "
            f"{os.cpu_count()} cores  load avg {os.getloadavg()[0]:.2f}"
        )
        t0 = time.perf_counter()
        nbytes = make_jpegs(work / "src", args.num_images)
        print(
            f"made {args.num_images} 224x224 JPEGs ({nbytes / args.num_images / 1024:.1f} KB avg) "
            f"in {time.perf_counter() - t0:.1f}s"
        )

        rows = []
        for w, mode in ((1, "in_memory"), (2, "multi_processing")):
            r = bench_prepare(work / "src", work / f"out{w}", w, mode)
            rows.append(
                [
                    f"FnApiRunner {mode} x{w}",
                    r["n"],
                    f"{r['wall']:.2f}",
                    f"{r['per_s']:.0f}",
                    f"{r['per_cpu_s']:.0f}",
                    f"{r['per_cpu_s'] / 500:.2f}",
                ]
            )
        n, rate = bench_element(work / "src")
        rows.append(["per-image work only (no Beam)", n, "", f"{rate:.0f}", "", ""])
        print(
            "\nprepare (224^2 JPEG -> validate -> JPEG q95 -> ArrayRecord + manifest; "
            "target 500 img/s/core)"
        )
        print(table(["run", "images", "wall s", "img/s", "img/s/core", "vs target"], rows))

        split = work / "out1" / "bench" / "train"
        common = dict(
            batch_size=args.batch_size,
            size=args.image_size,
            warmup=args.warmup,
            batches=args.batches,
        )
        pipelines = (
            ("grain", grain_iterator),
            ("tf.data", tfdata_iterator),
            ("grain processes", grain_processes_iterator),
        )
        res = {
            (name, w): bench_loader(make, split, w, rounds=args.rounds, **common)
            for w in workers
            for name, make in pipelines
        }
        rows = []
        for w in workers:
            (g, gc), (t, tc), (p, pc) = (res[name, w] for name, _ in pipelines)
            rows.append(
                [
                    w,
                    f"{g:.0f}",
                    f"{t:.0f}",
                    f"{g / t:.2f}",
                    f"{gc:.0f}",
                    f"{tc:.0f}",
                    f"{gc / tc:.2f}",
                    f"{p:.0f}",
                    f"{p / t:.2f}",
                ]
            )
        print(
            f"\nloader ({args.image_size}^2 Inception crops + flip from the 224^2 records, batch "
            f"{args.batch_size}, host batches; best of {args.rounds} windows of {args.batches} "
            f"batches; target Grain/tf.data >= 2)"
        )
        print(
            table(
                [
                    "workers",
                    "grain img/s",
                    "tf.data img/s",
                    "ratio",
                    "grain img/cpu-s",
                    "tf.data img/cpu-s",
                    "ratio/cpu",
                    "grain procs img/s",
                    "procs ratio",
                ],
                rows,
            )
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
