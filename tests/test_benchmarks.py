"""Smoke tests of the benchmark scripts: they run end to end on a micro model and print complete
tables.

No timing assertions: numbers only have to be finite and positive where they are rates.
"""

import pytest

from benchmarks import harness, mfu, model
from md_tables import number as _number, tables as _tables


def test_model_smoke(capsys):
    rows = model.main(["--preset", "smoke", "--variants", "vit22b,sequential,bias"])
    out = capsys.readouterr().out
    (tab,) = _tables(out)
    assert tab[0] == model.COLUMNS
    assert [r[0] for r in tab[1:]] == ["vit22b", "sequential", "bias"]
    numeric = model.COLUMNS.index("params M")
    for r in tab[1:]:
        values = dict(zip(model.COLUMNS[numeric:], map(_number, r[numeric:])))
        assert all(
            values[k] > 0 for k in ("params M", "step ms", "ex/s", "model TFLOP/s", "MFU %")
        ), r
    assert float(tab[2][-1]) == 1.0  # the sequential baseline against itself
    assert "~15% faster" in out and "+3% utilization" in out
    assert (
        "parallel + fused block vs sequential" in out
        and "dropping biases (vit22b vs bias): MFU" in out
    )
    assert {r["variant"] for r in rows} == {"vit22b", "sequential", "bias"}


def test_model_rejects_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        model.main(["--preset", "smoke", "--variants", "vit22b,nope"])


def test_model_rejects_unknown_override():
    with pytest.raises(ValueError, match="unknown ViT config field 'widht'"):
        model.main(["--preset", "smoke", "--variants", "vit22b", "--override", "widht=64"])


def test_parse_overrides():
    assert harness.parse_overrides(["depth=8", "dtype=bfloat16", "qk_norm=False"]) == dict(
        depth=8, dtype="bfloat16", qk_norm=False
    )
    with pytest.raises(ValueError, match="KEY=VALUE"):
        harness.parse_overrides(["depth"])


def test_mfu_smoke(capsys):
    mfu.main(["--preset", "smoke", "--mesh", "4,2"])
    out = capsys.readouterr().out
    matmul, step = _tables(out)
    assert matmul[0] == mfu.MATMUL_COLUMNS
    assert _number(matmul[1][3]) > 0  # measured TFLOP/s per device
    assert step[0] == mfu.STEP_COLUMNS
    (row,) = step[1:]
    assert row[:2] == ["mu/8", "4 x 2"]
    values = dict(zip(mfu.STEP_COLUMNS[2:], map(_number, row[2:])))
    assert all(
        values[k] > 0 for k in ("model GFLOP/step", "step ms", "achieved TFLOP/s", "MFU %")
    ), row
    assert "54.9%" in out


def test_data_benchmark_smoke(capsys):
    """The data benchmark runs end to end on a few images (real Beam job, Grain, tf.data)."""
    from benchmarks import data

    data.main(
        [
            "--num_images",
            "96",
            "--batch_size",
            "16",
            "--batches",
            "1",
            "--warmup",
            "1",
            "--rounds",
            "1",
            "--workers",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "FnApiRunner in_memory x1 |     96 |" in out
    row = [line for line in out.splitlines() if line.startswith("|       1 |")]
    assert len(row) == 1 and len(row[0].split("|")) == 11  # workers + 9 measured columns
