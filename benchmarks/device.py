"""One accelerator, bounded time: the MFU sweep of the true ViT-22B layer and the block step-time
table.

    bash benchmarks/device.sh                                   # one H200: both tables in ~8 min
    python -m benchmarks.device --preset gpu --budget_s 450     # what device.sh runs
    python -m benchmarks.device --preset smoke --budget_s 120   # CPU, micro model, seconds (tests)

(1) MFU sweep: the train step of `trainer/step.py` (benchmarks/harness.py's `build_runner`:
    forward, backward, Adafactor update, sigmoid xent, synthetic batch, one device) of ViT-22B's
    layer (width 6144, 48 heads, MLP 24576, 256 tokens = 224 px / 14, bf16 compute, f32 params) at a
    reduced depth, around a base point (batch, remat, scan, XLA flag set) one change at a time.
    MFU = model FLOPs/step (PaLM's formula, trainer/flops.py) / median step time / peak, against
    both the vendor bf16 peak (989 TFLOP/s for an H200; on CPU: a measured float32 matmul, as
    everywhere in this repo) and the bf16 matmul rate measured first in the same run
    (trainer/flops.py measure_matmul_peak): the second says how close the step gets to what this
    chip's matmuls reach.
(2) Block table: benchmarks/model.py's variants (parallel vit22b, sequential, bias, no_qk_norm, ...)
    at the base point, with benchmarks/model.py's columns and claims footer.

Robust by construction: configurations run in a worker process (`--worker`), one flag set per
worker (the set goes in XLA_FLAGS before JAX starts: trainer/xla_flags.py, the stage's own
mechanism); an exception (e.g. out of memory) becomes that row's error and the worker goes on; a
worker that dies is restarted for the remaining configurations; `--budget_s` bounds the total: a
worker skips a configuration it expects not to finish and is killed at the deadline, and every
configuration that did not run gets a row saying so. The parent never touches the device (a
GPU's memory is the workers'). Imports only jax/flax/optax/numpy + trainer/benchmarks modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import harness
from benchmarks import model as model_bench
from trainer import markdown

TAG = "@@device "  # the worker's protocol lines on stdout (JAX and XLA log to stderr/stdout too)

# model / blocks: benchmarks/model.py's presets and variants; base: the sweep's centre point;
# sweep: (label, changes to the base) in priority order (a budget cut drops the last ones).
PRESETS: dict[str, dict] = {
    # Seconds on CPU (tests/test_device_bench.py): both tables from one worker, 2 compiles, at XLA's
    # lowest backend optimization level (half the compile time; the numbers mean nothing here).
    "smoke": dict(
        model=model_bench.PRESETS["smoke"]["model"],
        base=dict(batch=2, remat="none", scan=True),
        sweep=[],
        flag_sets=(),
        blocks=("vit22b", "sequential"),
        matmul_sizes=(64,),
        matmul_dtype="float32",
        repeats=2,
        steps=1,
        warmup=0,
        compiler_options={"xla_backend_optimization_level": 0},
    ),
    # ViT-22B's layer x 4 (2.28B params, 94 model TFLOP/step at batch 32; see benchmarks/model.py).
    "gpu": dict(
        model=model_bench.PRESETS["gpu"]["model"],
        base=dict(batch=32, remat="none", scan=True),
        sweep=[
            ("batch 64", dict(batch=64)),
            ("batch 64, remat dots_no_batch", dict(batch=64, remat="dots_no_batch")),
            ("batch 128, remat dots_no_batch", dict(batch=128, remat="dots_no_batch")),
            ("no scan", dict(scan=False)),
            ("batch 256, remat full", dict(batch=256, remat="full")),
        ],
        flag_sets=("latency_hiding", "async_collectives", "collective_matmul"),
        blocks=("vit22b", "sequential", "bias", "no_qk_norm"),
        matmul_sizes=(8192, 16384),
        matmul_dtype="bfloat16",
        repeats=5,
        steps=2,
        warmup=1,
    ),
}

MFU_COLUMNS = [
    "config",
    "flags",
    "batch",
    "remat",
    "scan",
    "depth",
    "compile s",
    "temp GiB",
    "step ms",
    "spread %",
    "ex/s",
    "model TFLOP/s",
    "MFU % vs peak",
    "MFU % vs matmul",
    "status",
]


@dataclasses.dataclass
class Job:
    id: str
    kind: str  # "matmul" | "step"
    flags: str = "default"  # trainer/xla_flags.py set name
    variant: str = ""
    overrides: dict = dataclasses.field(default_factory=dict)
    batch: int = 0
    label: str = ""


def plan(p: dict) -> list[list[Job]]:
    """Worker groups (one XLA flag set each) in run order; each group's jobs in priority order."""
    variant, model = p["model"]
    base = p["base"]

    def step(jid, label, changes=None, flags="default", block="vit22b"):
        point = {**base, **(changes or {})}
        overrides = {
            **model,
            **model_bench.VARIANTS[block],
            "remat": point["remat"],
            "scan": point["scan"],
        }
        return Job(jid, "step", flags, variant, overrides, point["batch"], label)

    default = [Job("matmul", "matmul"), step("base", "base")]
    default += [
        step(f"block:{b}", b, block=b) for b in p["blocks"] if b != "vit22b"
    ]  # vit22b = base
    default += [step(f"sweep:{i}", label, changes) for i, (label, changes) in enumerate(p["sweep"])]
    # Flag sets last: on one device there are no collectives for the async/collective-matmul sets to
    # overlap (only the scheduler changes); they matter when the same script runs on several GPUs.
    return [default, *([step(f"flags:{f}", f"flags {f}", flags=f)] for f in p["flag_sets"])]


# --------------------------------------------------------------------------------------------------
# Worker: runs jobs in this process, one protocol line per job.


def _emit(msg_type: str, **fields) -> None:
    print(TAG + json.dumps({"type": msg_type, **fields}), flush=True)


def run_job(job: Job, p: dict) -> dict:
    """One job's measurements (raises on failure, e.g. out of memory)."""
    import jax

    from trainer import flops, sharding
    from trainer.models import vit

    if job.kind == "matmul":
        import jax.numpy as jnp

        rates = {
            size: flops.measure_matmul_peak(
                jax.devices()[:1],
                size=size,
                dtype=jnp.dtype(p["matmul_dtype"]),
                repeats=max(3, p["repeats"]),
            )
            for size in p["matmul_sizes"]
        }
        return {"matmul_flops": max(rates.values()), "by_size": rates, "dtype": p["matmul_dtype"]}
    cfg = vit.make_config(job.variant, **job.overrides)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    runner = harness.build_runner(
        cfg, mesh, job.batch, p["warmup"], compiler_options=p.get("compiler_options", {})
    )
    try:
        times = [runner.run(p["steps"]) for _ in range(p["repeats"])]
        temp = getattr(runner.memory, "temp_size_in_bytes", None)
        return {"times": times, "compile_s": runner.compile_s, "temp_bytes": temp}
    finally:
        del runner
        gc.collect()


def worker(jobs: list[Job], p: dict, deadline: float) -> None:
    """Runs `jobs` in order; skips one it expects to end past `deadline` (epoch seconds)."""
    import jax

    d = jax.devices()
    peak, source = harness.peak_per_device(d[:1])
    _emit(
        "info",
        jax=jax.__version__,
        platform=d[0].platform,
        kind=d[0].device_kind,
        devices=len(d),
        peak=peak,
        peak_source=source,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
    longest = 0.0
    for job in jobs:
        if time.time() + longest > deadline:
            _emit(
                "row",
                id=job.id,
                status=f"skipped: time budget (a config took up to {longest:.0f} s)",
            )
            continue
        _emit("start", id=job.id)
        start = time.time()
        try:
            _emit("row", id=job.id, status="ok", **run_job(job, p))
        except Exception as e:  # noqa: BLE001  (one failing config is a row; the sweep goes on)
            _emit("row", id=job.id, status=f"error: {type(e).__name__}: {_one_line(str(e))}")
        longest = max(longest, time.time() - start)
        jax.clear_caches()


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Parent: one worker process per group, restarted when one dies, killed at the deadline.


def _flag_env(name: str, platform_name: str) -> dict:
    env = dict(os.environ)
    if name != "default":
        from trainer import xla_flags

        xla_flags.apply(platform_name, name, env)
    # Let the workers use most of an accelerator's memory (JAX preallocates 75% by default).
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
    return env


def _run_group(jobs: list[Job], p: dict, deadline: float, results: dict, info: dict, log) -> None:
    """Runs one group's jobs in worker processes until all have a row or the deadline passes."""
    pending = list(jobs)
    while pending:
        if time.time() >= deadline:
            for job in pending:
                results[job.id] = {"status": "skipped: time budget"}
            return
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"jobs": [dataclasses.asdict(j) for j in pending], "p": p}, f)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.device",
            "--worker",
            f.name,
            "--deadline",
            str(deadline - 5),
        ]
        err = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
            env=_flag_env(pending[0].flags, p.get("flag_platform", "gpu")),
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True
        ).start()
        current = None
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:  # the deadline: stop the worker, whatever it is doing
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if current:
                    results[current] = {"status": "killed: time budget"}
                break
            if line is None:
                break
            if not line.startswith(TAG):
                continue
            msg = json.loads(line[len(TAG) :])
            if msg["type"] == "info":
                info.update(msg)
            elif msg["type"] == "start":
                current = msg["id"]
                log(f"running {current}")
            elif msg["type"] == "row":
                results[msg["id"]] = msg
                current = None
                log(f"  {msg['id']}: {msg['status']}")
        rc = proc.wait()
        os.unlink(f.name)
        err.seek(0)
        tail = _one_line(([x for x in err.read().splitlines() if x.strip()][-1:] or [""])[0])
        err.close()
        if (
            current
        ):  # the worker died inside a job: that job is the culprit; the rest get a new worker
            results[current] = {"status": f"error: worker died (rc {rc}): {tail}"}
        left = [j for j in pending if j.id not in results]
        if len(left) == len(pending):  # died before any job (start-up): a new worker would too
            for job in left:
                results[job.id] = {"status": f"error: worker failed to start (rc {rc}): {tail}"}
            return
        pending = left


def sweep(p: dict, budget_s: float, log=lambda msg: None) -> tuple[list[list[Job]], dict, dict]:
    deadline = time.time() + budget_s
    groups, results, info = plan(p), {}, {}
    for group in groups:
        _run_group(group, p, deadline, results, info, log)
    return groups, results, info


# --------------------------------------------------------------------------------------------------
# Tables.


def _step_row(job: Job, r: dict, info: dict, matmul: float | None) -> dict:
    """A finished step job's numbers in benchmarks/model.py's row format (+ MFU vs the matmul)."""
    from trainer import flops
    from trainer.models import vit

    cfg = vit.make_config(job.variant, **job.overrides)
    t = statistics.median(r["times"])
    m = harness.step_metrics(cfg, job.batch, t, 1, info["peak"])
    return dict(
        variant=job.label,
        cfg=cfg,
        compile_s=r["compile_s"],
        times=r["times"],
        ms=1e3 * t,
        spread=harness.spread(r["times"]),
        params=flops.param_count(cfg),
        temp=r.get("temp_bytes"),
        mfu_matmul=m["flops"] / t / matmul if matmul else None,
        **m,
    )


def report(
    p: dict, preset: str, budget_s: float, groups, results: dict, info: dict, seconds: float
) -> str:
    from trainer.models import vit

    jobs = {j.id: j for g in groups for j in g}
    mm = results.get("matmul", {})
    matmul = mm.get("matmul_flops")
    variant, model = p["model"]
    base_cfg = vit.make_config(variant, **model)
    lines = [
        f"# device benchmark  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
        f"preset {preset}  jax {info.get('jax', '?')}  {platform.node()}  "
        f"{info.get('devices', '?')} x {info.get('platform', '?')} "
        f"({info.get('kind', '?')}); one device used; {seconds:.0f} s of a {budget_s:.0f} s budget",
        harness.model_line(base_cfg, p["base"]["batch"]).replace(
            "remat none", "remat/scan/batch: per row"
        ),
        f"peak per device {info['peak'] / 1e12:.4g} TFLOP/s ({info['peak_source']})"
        if "peak" in info
        else "peak: no worker started",
        (
            f"measured {mm['dtype']} matmul (flops.measure_matmul_peak, sizes "
            f"{', '.join(map(str, p['matmul_sizes']))}): {matmul / 1e12:.4g} TFLOP/s"
            if matmul
            else f"measured matmul: {mm.get('status', 'not run')}"
        ),
        f"median of {p['repeats']} repeats x {p['steps']} step(s) after 1 compiling + "
        f"{p['warmup']} warm-up step(s); temp GiB = XLA's temporaries of the compiled step "
        "(memory_analysis)",
        "",
    ]

    # (1) MFU sweep.
    body = []
    for jid in ["base"] + [
        j.id for g in groups for j in g if j.id.startswith(("sweep:", "flags:"))
    ]:
        job, r = jobs[jid], results.get(jid, {"status": "not run"})
        o = job.overrides
        cells = [job.label, job.flags, job.batch, o["remat"], o["scan"], o["depth"]]
        if r.get("status") == "ok":
            row = _step_row(job, r, info, matmul)
            temp = f"{row['temp'] / 2**30:.2f}" if row["temp"] is not None else "n/a"
            cells += [
                f"{row['compile_s']:.1f}",
                temp,
                f"{row['ms']:.2f}",
                f"{row['spread']:.1f}",
                f"{row['ex_s']:.1f}",
                harness.sig(row["tflops"]),
                harness.sig(100 * row["mfu"]),
                harness.sig(100 * row["mfu_matmul"]) if row["mfu_matmul"] else "n/a",
                "ok",
            ]
        else:
            cells += ["-"] * 8 + [r["status"]]
        body.append(cells)
    lines += [
        (
            "(1) MFU sweep (one change from the base row at a time); "
            "paper: 54.9% MFU (ViT-22B, TPU v4)"
        ),
        markdown.table(MFU_COLUMNS, body),
        "",
    ]

    # (2) Block table: benchmarks/model.py's columns and claims.
    rows, failed = [], []
    for block in p["blocks"]:
        jid = "base" if block == "vit22b" else f"block:{block}"
        r = results.get(jid, {"status": "not run"})
        if r.get("status") == "ok":
            rows.append(dict(_step_row(jobs[jid], r, info, matmul), variant=block))
        else:
            failed.append((block, r["status"]))
    base_times = next((r["times"] for r in rows if r["variant"] == model_bench.BASELINE), None)
    for r in rows:
        r["vs_base"] = (
            harness.speedup(r["times"], base_times, paired=False) if base_times else float("nan")
        )
    body = [model_bench.cells(r) + ["ok"] for r in rows]
    body += [
        [block] + ["-"] * (len(model_bench.COLUMNS) - 1) + [status] for block, status in failed
    ]
    lines += [
        f"(2) block variants at the base point (batch {p['base']['batch']}, "
        f"remat {p['base']['remat']}, scan {p['base']['scan']}, default flags); "
        "speed vs sequential = its step time / step time; " + model_bench.PAPER,
        markdown.table(model_bench.COLUMNS + ["status"], body),
        "measured vs paper:",
        *model_bench.claims(rows, paired=False),
    ]
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=tuple(PRESETS), default="gpu")
    ap.add_argument("--budget_s", type=float, default=450.0, help="wall-clock bound for everything")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # a job file: run as a worker process
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(open(args.worker).read())
        worker([Job(**j) for j in spec["jobs"]], spec["p"], args.deadline)
        return ""
    if args.budget_s <= 0:
        raise ValueError(f"--budget_s={args.budget_s} must be > 0")
    p = dict(PRESETS[args.preset])
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"--repeats={args.repeats} must be >= 1")
        p["repeats"] = args.repeats
    start = time.time()
    groups, results, info = sweep(
        p, args.budget_s, log=lambda msg: print(msg, file=sys.stderr, flush=True)
    )
    out = report(p, args.preset, args.budget_s, groups, results, info, time.time() - start)
    print(out, flush=True)
    return out


if __name__ == "__main__":
    main()
