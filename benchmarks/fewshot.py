"""The few-shot evaluator's host solve: time per call, float64 (what it runs) vs float32.

    python -m benchmarks.fewshot    # 10 x 25 and 1000 x 10 at width 768
    python -m benchmarks.fewshot --cases 10x25,100x10,1000x10 --width 1024 \
        --test_per_class 20 --repeats 5

Synthetic features (class means ~ N(0, 0.15^2), within-class noise N(0, 1) per dimension) of
`--width` dimensions; per case "C x K": C classes with 2K train examples each and
`--test_per_class` test examples each. Timed with trainer/evaluators/fewshot.py as the evaluator
calls it (features already on the host; their extraction is the model's forward pass over the two
splits, not measured here):

- one solve: `fit` on the K-shot set + `predict` on the test set (one seed, one shot count);
- one call: `evaluate` over 3 seeds and every shot count of (1, 5, 10, 25) up to K, i.e. what one
  in-training `fewshot` evaluation costs on the host.

Median of `--repeats`. The float32 columns run the same code with dtype=float32 (big_vision's
choice); "max |Δacc|" is the largest top-1 difference from float64 over the call's seeds and shot
counts, and "W rel. err" the relative Frobenius error of the float32 weights of the one solve.

Imports only NumPy + trainer/evaluators: runs on an accelerator host as is (the solve is host-side).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np

from trainer.evaluators import fewshot
from trainer.markdown import table

SHOTS = fewshot.SHOTS
SEPARATION = 0.15  # class means' scale vs unit within-class noise: few-shot top-1 well below 1


def synthetic(
    classes: int, per_class: int, width: int, rng: np.random.Generator, means: np.ndarray
):
    y = np.repeat(np.arange(classes), per_class)
    x = (means[y] + rng.standard_normal((len(y), width))).astype(np.float32)
    return x, y


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def case_row(classes: int, shots: int, width: int, test_per_class: int, repeats: int) -> list:
    rng = np.random.default_rng(0)
    means = SEPARATION * rng.standard_normal((classes, width))
    train_x, train_y = synthetic(classes, 2 * shots, width, rng, means)
    test_x, test_y = synthetic(classes, test_per_class, width, rng, means)
    idx = fewshot.subsets(train_y, classes, (shots,), seed=0)[shots]
    call_shots = tuple(k for k in SHOTS if k <= shots)
    row = [
        f"{classes} x {shots}",
        width,
        len(idx),
        len(test_y),
        "AᵀA" if len(idx) >= width + 1 else "AAᵀ",
    ]
    solves, calls, results, weights = {}, {}, {}, {}
    for dtype in (np.float64, np.float32):
        solve = lambda: fewshot.fit(train_x[idx], train_y[idx], classes, fewshot.L2, dtype)
        solves[dtype], ridge = median_time(lambda: (r := solve(), r.predict(test_x))[0], repeats)
        weights[dtype] = ridge.w
        calls[dtype], results[dtype] = median_time(
            lambda: fewshot.evaluate(
                train_x, train_y, test_x, test_y, classes, shots=call_shots, seeds=3, dtype=dtype
            ),
            repeats,
        )
    diff = max(
        abs(a - b)
        for k in call_shots
        for a, b in zip(results[np.float64][k], results[np.float32][k])
    )
    rel = np.linalg.norm(weights[np.float32] - weights[np.float64]) / np.linalg.norm(
        weights[np.float64]
    )
    row += [
        f"{solves[np.float64]:.3f}",
        f"{calls[np.float64]:.2f}",
        f"{solves[np.float32]:.3f}",
        f"{calls[np.float32]:.2f}",
        f"{diff:.4f}",
        f"{rel:.1e}",
        f"{np.mean(results[np.float64][shots]):.3f}",
        len(call_shots) * 3,
    ]
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="10x25,1000x10", help="comma-separated CLASSESxSHOTS")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--test_per_class", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",") if c]
    print(
        f"# fewshot benchmark  {datetime.date.today()}  numpy {np.__version__}  "
        f"{platform.machine()}  {os.cpu_count()} CPUs  load avg {os.getloadavg()[0]:.2f}"
    )
    print(
        f"synthetic features, width {args.width}, {args.test_per_class} test examples per class; "
        f"l2 {fewshot.L2:g}; median of {args.repeats}; times in seconds"
    )
    headers = [
        "classes x shots",
        "width",
        "train N",
        "test N",
        "eigh of",
        "f64 solve s",
        "f64 call s",
        "f32 solve s",
        "f32 call s",
        "max |Δacc| f32",
        "W rel. err f32",
        "top-1 (f64)",
        "solves/call",
    ]
    print(
        table(
            headers,
            [case_row(c, k, args.width, args.test_per_class, args.repeats) for c, k in cases],
        )
    )


if __name__ == "__main__":
    main()
