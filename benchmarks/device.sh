#!/usr/bin/env bash
# One GPU (an H200 in mind), as the machine comes (jax, flax, optax, orbax, numpy; no network):
# the ViT-22B-layer MFU sweep and the block step-time table, bounded by BUDGET_S (default 450 s,
# so the whole command ends within ~8 min). Extra arguments go to benchmarks/device.py.
#
#     bash benchmarks/device.sh                      # from the repo root or anywhere
#     BUDGET_S=300 bash benchmarks/device.sh --repeats 3
set -euo pipefail
cd "$(dirname "$0")/.."
# A rerun on the same machine reuses the compiled steps (compile time is most of a config's time).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache_vit22b_device}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PYTHON" -m benchmarks.device --preset gpu --budget_s "${BUDGET_S:-450}" "$@"
