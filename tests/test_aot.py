"""AOT tier: the ViT-22B train step at its true width/heads/MLP (2 layers) compiled by libtpu for a
small TPU v4 slice on this CPU host (trainer/aot.py, benchmarks/aot.py). The compile needs the
[tpu] extra, which `make` installs; skipped with a reason without it."""

import pytest

from trainer import aot

needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_installed(),
    reason="AOT for a TPU topology needs libtpu (pip install -c constraints.txt '.[tpu]')",
)

HLO = """HloModule m, is_scheduled=true

%fused_dot (p0: bf16[8,8], p1: bf16[8,8]) -> bf16[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %d = bf16[8,8]{1,0} convolution(%p0, %p1), dim_labels=bf_io->bf
}

ENTRY %main (a: bf16[8,8], b: bf16[8,8]) -> bf16[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %b = bf16[8,8]{1,0} parameter(1)
  %cp-start = (bf16[8,8]{1,0}, bf16[8,8]{1,0}) collective-permute-start(%a), \
source_target_pairs={{0,1},{1,0}}
  %f = bf16[8,8]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_dot
  %cp-done = bf16[8,8]{1,0} collective-permute-done(%cp-start)
  %cp-start.1 = (bf16[8,8]{1,0}, bf16[8,8]{1,0}) collective-permute-start(%f), \
source_target_pairs={{0,1},{1,0}}
  %cp-done.1 = bf16[8,8]{1,0} collective-permute-done(%cp-start.1)
  ROOT %s = bf16[8,8]{1,0} add(%cp-done, %cp-done.1)
}
"""


def test_permute_overlap_reads_the_schedule():
    """A dot fusion between a start and its done counts; an empty window does not."""
    assert (aot.permute_overlap(HLO).pairs, aot.permute_overlap(HLO).overlapped) == (2, 1)
    ours = HLO.replace(
        "source_target_pairs={{0,1},{1,0}}\n  %f",
        'metadata={op_name="jit(f)/shard_map/ppermute"}\n  %f',
    )
    assert aot.permute_overlap(ours) == aot.Overlap(2, 1, 0, 1, 1)


def test_benchmark_without_libtpu_says_so_and_estimates(monkeypatch, capsys):
    from benchmarks import aot as bench

    monkeypatch.setattr(aot, "libtpu_installed", lambda: False)
    bench.main(["--topologies", "v4:8x8x16"])
    out = capsys.readouterr().out
    assert "libtpu is not installed (pip install -c constraints.txt '.[tpu]')" in out
    assert "v4:8x8x16: 1024 chips, mesh data x model = 64x16: eval_shape estimate" in out
    with pytest.raises(ValueError, match="unknown flag set 'fast' for tpu"):
        bench.parse_variant("xla+fast")


@needs_libtpu
def test_22b_width_fits_v4_and_the_rings_overlap():
    """2 layers of the true 22B block (width 6144, 48 heads, MLP 24576, bf16, remat dots_no_batch,
    Adafactor; launch/configs/vit22b.py's pretrain step) on v4:2x2x1 (4 chips, data 1 x model 4):
    the collective variant fits the chip and its ring permutes are async with dots scheduled
    between start and done. (Memory vs XLA's matmul at the real 22B config: benchmarks/aot.py.)"""
    from benchmarks import aot as bench

    group = bench.pretrain_group(
        "launch/configs/vit22b.py",
        {"model.depth": 2, "batch_size": 8, "mesh.model": 4, "microbatches": 1},
    )
    row = bench.compile_row(group, "v4:2x2x1", "collective", "default", 1000, 0.1)
    assert "error" not in row, row
    assert (row["devices"], row["mesh"], row["depth"]) == (4, "1x4", 2)
    assert row["total"] <= row["usable"], row
    assert row["loops"] and row["xla_flops"] > 0 and row["model_flops"] > 0
    overlap = row["overlap"]
    # Our ppermutes (2 rings forward, their transposes and the backward's recomputed hops; XLA's own
    # permutes are counted apart): async, and most with a dot between start and done.
    assert overlap.ring_pairs >= 4 and overlap.ring_overlapped >= overlap.ring_pairs // 2, overlap
