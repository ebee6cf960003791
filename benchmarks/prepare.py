"""Prepare at scale: peak memory and throughput of the real prepare job as the image count grows.

    python -m benchmarks.prepare                                   # 2,000 / 8,000 / 50,000 images
    python -m benchmarks.prepare --num_images 2000,8000 --workers 1,2

For each count the script writes that many 224x224 photo-like JPEGs (benchmarks/data.py's
generator) into an image folder and runs the prepare CLI on it in a child process
(`python -m pipelines.prepare --source folder ...`: decode, validate, re-encode q95, ArrayRecord
shards + manifest), with the FnApiRunner in_memory (1 worker) or multi_processing (N workers).
Reported per run: wall time, images/s, images per CPU-second (the job's processes together, i.e.
per core actually used), and peak RSS: of the largest single process (getrusage of the reaped
children) and of the whole process tree (sampled every 0.2 s, so short spikes can be missed).
Bounded memory = the peak RSS does not grow with the image count.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainer.markdown import table

# One header for the per-size rows printed as they are measured and the final table.
COLUMNS = (
    "runner",
    "images",
    "wall s",
    "img/s",
    "img/s/core",
    "peak RSS MiB (process)",
    "peak RSS MiB (tree)",
)

REPO = Path(__file__).resolve().parents[1]


def tree_rss(proc) -> int:
    """Bytes resident in `proc` and all its live descendants (Beam SDK workers)."""
    import psutil

    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_prepare(src: Path, out: Path, workers: int) -> dict:
    """One prepare job in a child process: wall s, CPU s, peak single-process and tree RSS."""
    import psutil

    mode = "in_memory" if workers == 1 else "multi_processing"
    cmd = [
        sys.executable,
        "-m",
        "pipelines.prepare",
        "--source",
        "folder",
        "--root",
        str(src),
        "--out",
        str(out),
        "--dataset",
        "bench",
        "--image_size",
        "0",
        "--records_per_shard",
        "1024",
        "--direct_num_workers",
        str(workers),
        "--direct_running_mode",
        mode,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    child = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc, peak_tree = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak_tree = max(peak_tree, tree_rss(proc))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - start
    if child.returncode:
        raise RuntimeError(f"prepare failed ({child.returncode}): {stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    accepted = next(int(w.split("=")[1]) for w in stdout.split() if w.startswith("accepted="))
    # ru_maxrss (KiB on Linux) is the largest reaped descendant so far: runs go small to large.
    return {
        "mode": f"{mode} x{workers}",
        "n": accepted,
        "wall": wall,
        "cpu": cpu,
        "peak_process": after.ru_maxrss * 1024,
        "peak_tree": peak_tree,
    }


def grow_folder(src: Path, have: int, want: int, make_jpegs) -> int:
    """Adds images have..want-1 to the class folders of `src` (names kept apart by their offset)."""
    part = src.parent / f"part-{have}"
    nbytes = make_jpegs(part, want - have, seed=have)
    for path in sorted(part.rglob("*.jpg")):
        dest = src / path.parent.name / f"{have}-{path.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        path.rename(dest)
    shutil.rmtree(part)
    return nbytes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num_images", default="2000,8000,50000", help="comma list, ascending")
    ap.add_argument(
        "--workers", default="1", help="comma list of FnApiRunner workers (1 = in_memory)"
    )
    ap.add_argument("--workdir", default="", help="default: a temp dir, removed afterwards")
    args = ap.parse_args(argv)
    from benchmarks.data import make_jpegs

    counts = sorted(int(n) for n in args.num_images.split(","))
    workers = [int(w) for w in args.workers.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare_"))
    print(
        f"# prepare benchmark  {datetime.date.today()}  {platform.machine()}  "
        f"{os.cpu_count()} cores  load avg {os.getloadavg()[0]:.2f}"
    )
    rows = []
    try:
        made = 0
        for n in counts:
            t0 = time.perf_counter()
            nbytes = grow_folder(work / "src", made, n, make_jpegs)
            made = n
            print(
                f"made {n} images (+{nbytes / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
            for w in workers:
                out = work / f"out-{n}-{w}"
                r = run_prepare(work / "src", out, w)
                shutil.rmtree(out, ignore_errors=True)
                rows.append(
                    [
                        r["mode"],
                        r["n"],
                        f"{r['wall']:.0f}",
                        f"{r['n'] / r['wall']:.0f}",
                        f"{r['n'] / r['cpu']:.0f}",
                        f"{r['peak_process'] / 2**20:.0f}",
                        f"{r['peak_tree'] / 2**20:.0f}",
                    ]
                )
                print(
                    table(COLUMNS, rows[-1:]),
                    flush=True,
                )
        print(
            "\nprepare: 224^2 JPEG -> validate -> JPEG q95 -> ArrayRecord + manifest "
            "(CLI, child process)"
        )
        print(table(COLUMNS, rows))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
