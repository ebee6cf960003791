"""Grain input pipelines over prepared splits -> global `jax.Array` batches (docs/INTERFACES.md).

Train: ArrayRecord source (manifest validated first); batch numbers -> this process's stream
positions of the batch -> seeded per-epoch shuffle (data/shuffle.py) -> read + decode + augment
into the batch (seeded per record) -> to_iter_dataset (threads) -> [mixup] -> [mp_prefetch] ->
global arrays in the given batch sharding.
Eval: same source and slice, deterministic order, every example exactly once, the last batch
padded (`mask` False on padding).

Images leave the host as uint8 and become float32 in [-1, 1] on device (a jitted cast): 4x less
host memory traffic and inter-process copying than normalising on the host (with mixup the host
mixes in float32 and the device leaves them as they are).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from data import augment as augment_lib
from data import records
from data import shuffle as shuffle_lib
from data import manifest as manifest_lib

# Threads decoding whole batches in to_iter_dataset, per process (and per Grain worker), and the
# batches they may run ahead. The JPEG decoder and OpenCV release the GIL, so threads scale.
READ_THREADS = 2
READ_BUFFER_BATCHES = 2  # per thread
WORKER_BUFFER_BATCHES = 2  # per mp_prefetch worker; big buffers are a trap (docs/DESIGN.md §6)


def _mark_absl_flags_parsed() -> None:
    """Grain's mp_prefetch reads absl flags, unparsed outside absl.app.run (docs/DESIGN.md §6)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _seed(*parts: int) -> int:
    """A 32-bit seed from several ints (Grain wants seeds in [0, 2**32))."""
    return int(np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class _Fields:
    """The per-example arrays a split yields (fixed shapes, so batches are static)."""

    image_size: int
    num_classes: int
    real_labels: bool = False
    num_attributes: int = 0
    cue_conflict: bool = False
    tokenizer: Any = None  # data.tokenizer.ByteTokenizer: yield `tokens` + `text_mask` of a caption

    @classmethod
    def from_manifest(
        cls,
        m: manifest_lib.Manifest,
        first_record: records.Record | None,
        image_size: int,
        tokenizer: Any = None,
        where: str = "",
    ) -> "_Fields":
        num_attributes = 0
        if "attributes" in m.features and first_record is not None:
            num_attributes = len(first_record.attributes or ())
        if tokenizer is not None and "text" not in m.features:
            raise ValueError(
                f"{where}: split {m.dataset}/{m.split} has no `text` field, so it has no captions "
                "to tokenize (prepare it from a source with captions)"
            )
        return cls(
            image_size,
            m.num_classes,
            "real_labels" in m.features,
            num_attributes,
            "shape_label" in m.features,
            tokenizer,
        )

    def fill(self, out: dict[str, np.ndarray], i: int, rec: records.Record) -> None:
        """Writes rec's labels/metadata into row i of a batch made by `zeros`."""
        for c in rec.label:
            if not 0 <= c < self.num_classes:
                raise records.RecordError(
                    f"record {rec.id!r}: label {c} outside [0, {self.num_classes})"
                )
            out["labels"][i, c] = 1.0
        out["label"][i] = rec.label[0] if rec.label else -1
        if self.real_labels:
            out["real_labels"][i, list(rec.real_labels or ())] = 1.0
        if self.num_attributes:
            attrs = rec.attributes or ()
            if len(attrs) != self.num_attributes:
                raise records.RecordError(
                    f"record {rec.id!r}: {len(attrs)} attributes, expected {self.num_attributes}"
                )
            out["attributes"][i] = attrs
        if self.cue_conflict:
            out["shape_label"][i] = -1 if rec.shape_label is None else rec.shape_label
            out["texture_label"][i] = -1 if rec.texture_label is None else rec.texture_label

    def fill_text(self, out: dict[str, np.ndarray], i: int, caption: str) -> None:
        tokens, mask = self.tokenizer.encode([caption])
        out["tokens"][i], out["text_mask"][i] = tokens[0], mask[0]

    def zeros(self, n: int) -> dict[str, np.ndarray]:
        """A batch of n padding examples: what `fill` writes into, and eval's padding."""
        s = self.image_size
        out = {
            "image": np.zeros((n, s, s, 3), np.uint8),
            "labels": np.zeros((n, self.num_classes), np.float32),
            "label": np.full((n,), -1, np.int32),
        }
        if self.real_labels:
            out["real_labels"] = np.zeros((n, self.num_classes), np.float32)
        if self.num_attributes:
            out["attributes"] = np.zeros((n, self.num_attributes), np.int32)
        if self.cue_conflict:
            out["shape_label"] = np.full((n,), -1, np.int32)
            out["texture_label"] = np.full((n,), -1, np.int32)
        if self.tokenizer is not None:
            out["tokens"] = np.zeros((n, self.tokenizer.max_len), np.int32)  # all padding
            out["text_mask"] = np.zeros((n, self.tokenizer.max_len), bool)
        return out


# A batch is decoded by one Map call: its records are read and each image written straight into
# its row. Per-element Grain stages (index_shuffle ~18 us a record, map/slice/batch, np.stack)
# cost ~40% of the decode itself.


class _DecodeBatch(grain.transforms.Map):
    """Batch number -> this process's rows of that batch (dict of numpy arrays)."""

    def __init__(self, source: grain.sources.ArrayRecordDataSource, fields: _Fields):
        self.source, self.fields = source, fields

    @abc.abstractmethod
    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(record indices, stream positions) of the rows of batch `step`."""

    @abc.abstractmethod
    def image(self, data: bytes, position: int, out: np.ndarray) -> None:
        """Decodes (and augments) one record's image into `out`, a row of the batch."""

    def caption(self, rec: records.Record, position: int) -> str:
        """Which of the record's captions this row gets: the first (eval); training draws one."""
        if not rec.text:
            raise records.RecordError(f"record {rec.id!r}: no caption in a split with text")
        return rec.text[0]

    def map(self, step: int) -> dict[str, np.ndarray]:
        indices, positions = self.rows(step)
        out = self.fields.zeros(len(indices))
        for i, (index, position) in enumerate(zip(indices.tolist(), positions.tolist())):
            rec = records.decode(self.source[index])
            self.image(rec.image, position, out["image"][i])
            self.fields.fill(out, i, rec)
            if self.fields.tokenizer is not None:
                self.fields.fill_text(out, i, self.caption(rec, position))
        return out


class TrainDecodeBatch(_DecodeBatch):
    """One global stream cut into strided per-process slices: global batch s holds stream
    positions [s*B, (s+1)*B) and process pi the positions s*B + pi + k*pc, so N processes train
    on exactly the batches 1 process sees. Position p reads record shuffle(p) (a new permutation
    every epoch); its augmentation draws from Philox(seed) at counter p (as Grain's RandomMap
    does), so a record's crop depends neither on its batch nor on the process count."""

    def __init__(
        self,
        source,
        fields: _Fields,
        cfg: augment_lib.AugmentConfig,
        seed: int,
        *,
        global_batch_size: int,
        process_index: int,
        process_count: int,
    ):
        super().__init__(source, fields)
        self.cfg, self.seed, self.caption_seed = cfg, _seed(seed, 1), _seed(seed, 3)
        self.shuffle = shuffle_lib.EpochShuffle(len(source), _seed(seed, 0))
        self.offsets = process_index + process_count * np.arange(global_batch_size // process_count)
        self.global_batch_size = global_batch_size

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        positions = step * self.global_batch_size + self.offsets
        return self.shuffle(positions), positions

    def image(self, data: bytes, position: int, out: np.ndarray) -> None:
        rng = np.random.Generator(np.random.Philox(key=self.seed, counter=[0, 0, 0, position]))
        augment_lib.train_image(data, rng, self.fields.image_size, self.cfg, out=out)

    def caption(self, rec: records.Record, position: int) -> str:
        """One of the record's captions, drawn like the crop: Philox at counter `position` (its own
        key), so the draw depends neither on the batch, the process count nor the thread count."""
        if len(rec.text or ()) <= 1:
            return super().caption(rec, position)
        rng = np.random.Generator(
            np.random.Philox(key=self.caption_seed, counter=[0, 0, 0, position])
        )
        return rec.text[int(rng.integers(len(rec.text)))]


class EvalDecodeBatch(_DecodeBatch):
    """This process's records (pi, pi + pc, ...) in order, `local_batch_size` at a time; the last
    batch may be short (the loader pads it)."""

    def __init__(
        self,
        source,
        fields: _Fields,
        *,
        local_batch_size: int,
        process_index: int,
        process_count: int,
    ):
        super().__init__(source, fields)
        self.local_batch_size, self.pi, self.pc = local_batch_size, process_index, process_count
        self.num_local = len(range(process_index, len(source), process_count))

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        local = np.arange(
            step * self.local_batch_size, min((step + 1) * self.local_batch_size, self.num_local)
        )
        return self.pi + self.pc * local, local

    def image(self, data: bytes, position: int, out: np.ndarray) -> None:
        augment_lib.eval_image(data, self.fields.image_size, out=out)


class Mixup(grain.transforms.RandomMap):
    """Batch-level mixup (per host batch, seeded by Grain per batch)."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def random_map(
        self, batch: dict[str, np.ndarray], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        image, labels = augment_lib.mixup(rng, batch["image"], batch["labels"], self.alpha)
        return {**batch, "image": image, "labels": labels}


class _Globalizer:
    """Host batch (this process's rows) -> dict of global jax.Arrays in the batch sharding."""

    def __init__(self, sharding: NamedSharding, global_batch_size: int, process_count: int):
        # The caller's config checks (trainer.sharding.check_batch) have run; these guard the API.
        if not isinstance(sharding, NamedSharding) or any(tuple(sharding.spec)[1:]):
            raise ValueError(
                f"sharding must be a NamedSharding of the batch (leading) axis only, "
                f"e.g. trainer.sharding.batch_sharding(mesh); got {sharding!r}"
            )
        try:
            sharding.shard_shape((global_batch_size,))
        except ValueError:  # jax's IndivisibleError
            raise ValueError(
                f"global_batch_size={global_batch_size} must be divisible by the "
                f"shards of {sharding.spec} over mesh {dict(sharding.mesh.shape)}"
            ) from None
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be divisible by "
                f"process_count={process_count}"
            )
        self.sharding = sharding
        self.global_batch_size = global_batch_size
        self.process_count = process_count
        # XLA turns the division into a multiply by fl(1/127.5); centring first and clipping
        # keeps the contract's exact [-1, 1] range.
        self._normalize = jax.jit(
            lambda x: jnp.clip((x.astype(jnp.float32) - 127.5) / 127.5, -1.0, 1.0),
            out_shardings=self.sharding,
        )

    def __call__(self, host: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.process_count != jax.process_count():
            raise RuntimeError(
                f"loader built for process_count={self.process_count} but jax.process_count()="
                f"{jax.process_count()}: global arrays need every process; read host batches "
                "from `.iterator` (train) or `.host_batches()` (eval) instead"
            )
        out = {}
        for key, value in host.items():
            shape = (self.global_batch_size,) + value.shape[1:]
            out[key] = jax.make_array_from_process_local_data(self.sharding, value, shape)
        if out["image"].dtype == jnp.uint8:
            out["image"] = self._normalize(out["image"])
        return out


class _SplitLoader:
    """What train and eval loaders share: the validated split, this process's records, the
    batch geometry, the decode parallelism and the host -> global array conversion."""

    def __init__(
        self,
        split_dir,
        *,
        global_batch_size: int,
        image_size: int,
        sharding: NamedSharding,
        process_index: int | None,
        process_count: int | None,
        worker_count: int,
        read_threads: int,
        tokenizer: Any = None,
    ):
        if worker_count < 0 or read_threads < 1:
            raise ValueError(
                f"need worker_count >= 0 and read_threads >= 1, got {worker_count}, {read_threads}"
            )
        self.worker_count, self.read_threads = worker_count, read_threads
        # A bucket URI reads through a verified local copy ($VIT22B_DATA_CACHE); a mount as is.
        split_dir = manifest_lib.local_split(split_dir)
        m = manifest_lib.validate(split_dir)  # counts + sha256 before anything is read
        if m.num_records == 0:
            raise ValueError(f"{split_dir}: split has no records (see {m.dead_letters})")
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        if not 0 <= pi < pc:
            raise ValueError(f"process_index={pi} must be in [0, process_count={pc})")
        self._globalize = _Globalizer(sharding, global_batch_size, pc)
        self.source = grain.sources.ArrayRecordDataSource(m.shard_paths(split_dir))
        self._fields = _Fields.from_manifest(
            m, records.decode(self.source[0]), image_size, tokenizer, where=str(split_dir)
        )
        # Strided: each process reads a disjoint 1/pc of the records; union = the split.
        self.records = grain.MapDataset.source(self.source)[pi::pc]  # serialized, for inspection
        self.manifest = m
        self.num_classes = m.num_classes
        self.num_examples = m.num_records
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // pc
        self.process_index, self.process_count = pi, pc

    @property
    def sharding(self):
        """The NamedSharding of every batch array, the one it was given: the step's in_sharding."""
        return self._globalize.sharding

    def _iter_dataset(self, batches: grain.MapDataset, post=None) -> grain.IterDataset:
        """Decoded batches -> `read_threads` threads per process [-> post] [-> worker processes]."""
        ds = batches.to_iter_dataset(
            grain.ReadOptions(
                num_threads=self.read_threads,
                prefetch_buffer_size=READ_BUFFER_BATCHES * self.read_threads,
            )
        )
        if post is not None:
            ds = post(ds)
        if self.worker_count > 0:
            _mark_absl_flags_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.worker_count, per_worker_buffer_size=WORKER_BUFFER_BATCHES
                )
            )
        return ds


class TrainLoader(_SplitLoader):
    """Infinite iterator of global batches; `.iterator` is the Grain DatasetIterator (checkpoint
    it with grain.checkpoint.CheckpointSave/CheckpointRestore); get_state/set_state delegate."""

    def __init__(
        self,
        split_dir,
        *,
        global_batch_size: int,
        image_size: int,
        seed: int,
        augment_cfg: augment_lib.AugmentConfig,
        **kwargs,
    ):
        super().__init__(
            split_dir, global_batch_size=global_batch_size, image_size=image_size, **kwargs
        )
        pi, pc = self.process_index, self.process_count
        ds = grain.MapDataset.range(sys.maxsize).map(
            TrainDecodeBatch(  # batch numbers, forever
                self.source,
                self._fields,
                augment_cfg,
                seed,
                global_batch_size=global_batch_size,
                process_index=pi,
                process_count=pc,
            )
        )
        # Mixup pairs examples within this process's rows, so it alone depends on the process count.
        mixup = None
        if augment_cfg.mixup_alpha > 0:
            mixup = lambda it_ds: it_ds.random_map(
                Mixup(augment_cfg.mixup_alpha), seed=_seed(seed, 2, pi)
            )
        self.dataset = self._iter_dataset(ds, mixup)
        self.iterator = iter(self.dataset)

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict[str, jax.Array]:
        return self._globalize(next(self.iterator))

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)

    def close(self) -> None:
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()


class EvalLoader(_SplitLoader):
    """Re-iterable: each iter() is one deterministic pass over the split, every example exactly
    once; all processes yield `num_batches` batches, padded ones with `mask` False."""

    def __init__(self, split_dir, *, global_batch_size: int, image_size: int, **kwargs):
        super().__init__(
            split_dir, global_batch_size=global_batch_size, image_size=image_size, **kwargs
        )
        self.num_batches = math.ceil(self.num_examples / global_batch_size)
        decode = EvalDecodeBatch(
            self.source,
            self._fields,
            local_batch_size=self.local_batch_size,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        local_batches = math.ceil(decode.num_local / self.local_batch_size)
        self.dataset = self._iter_dataset(grain.MapDataset.range(local_batches).map(decode))

    def host_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """This process's numpy batches (with `mask`), exactly `num_batches` of them."""
        n, count = self.local_batch_size, 0
        iterator = iter(self.dataset)
        try:
            for batch in iterator:
                real = len(batch["label"])
                if real < n:
                    pad = self._fields.zeros(n - real)
                    batch = {k: np.concatenate([v, pad[k]]) for k, v in batch.items()}
                batch["mask"] = np.arange(n) < real
                count += 1
                yield batch
        finally:  # each pass's Grain worker processes (worker_count > 0) end with the pass
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        for _ in range(self.num_batches - count):  # this process ran out before the others
            yield {**self._fields.zeros(n), "mask": np.zeros(n, bool)}

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        for batch in self.host_batches():
            yield self._globalize(batch)

    def record_order(self) -> np.ndarray:
        """int [num_examples]: the record index of each real row of a pass, in global row order
        (padding left out): batch b holds process 0's b-th local batch, then process 1's, ...;
        process p reads records p, p + process_count, ... (EvalDecodeBatch)."""
        local, pc = self.local_batch_size, self.process_count
        per_process = [np.arange(p, self.num_examples, pc) for p in range(pc)]
        return np.concatenate(
            [
                rows[b * local : (b + 1) * local]
                for b in range(self.num_batches)
                for rows in per_process
            ]
        )

    def record_ids(self, labels: np.ndarray, where: str) -> np.ndarray:
        """str [num_examples]: the ids of the records in `record_order()`, read from the split.
        `labels` (first class id of each real row of a pass, in row order) must be theirs."""
        order, ids, got = self.record_order(), [], []
        for i in range(0, len(order), 1024):
            for raw in self.source.__getitems__(order[i : i + 1024].tolist()):
                rec = records.decode(raw)
                ids.append(rec.id)
                got.append(rec.label[0] if rec.label else -1)
        if not np.array_equal(np.asarray(got), labels):
            raise RuntimeError(
                f"{where}: rows and records are out of order (the loader's row order changed?)"
            )
        return np.asarray(ids, dtype=np.str_)


def train_loader(
    split_dir,
    *,
    global_batch_size: int,
    image_size: int,
    seed: int,
    sharding: NamedSharding,
    augment: augment_lib.AugmentConfig | Mapping[str, Any] | None = None,
    worker_count: int = 0,
    read_threads: int = READ_THREADS,
    process_index: int | None = None,
    process_count: int | None = None,
    tokenizer: Any = None,
) -> TrainLoader:
    """Training batches of `split_dir` (a prepared split). `augment`: None = Inception crop +
    flip, no mixup; or an AugmentConfig / mapping of its fields. Each process decodes with
    `read_threads` threads (the decoders release the GIL); `worker_count` > 0 moves that into as
    many Grain worker processes, each with `read_threads` threads. Batches: image f32 [B,H,W,3]
    in [-1,1], labels f32 [B,C] multi-hot (mixed with mixup), label int32 [B] (first class id, -1
    if none), plus real_labels / attributes / shape_label, texture_label when the split has them.
    With a `tokenizer` (data/tokenizer.py; the split must have text): tokens int32 [B,L] +
    text_mask bool [B,L] of one caption per example, drawn per stream position like the crop.
    `sharding`: every batch array's layout, `trainer.sharding.batch_sharding(mesh)` (the train
    step's batch in_sharding)."""
    return TrainLoader(
        split_dir,
        global_batch_size=global_batch_size,
        image_size=image_size,
        seed=seed,
        sharding=sharding,
        augment_cfg=augment_lib.AugmentConfig.from_any(augment),
        worker_count=worker_count,
        read_threads=read_threads,
        process_index=process_index,
        process_count=process_count,
        tokenizer=tokenizer,
    )


def eval_loader(
    split_dir,
    *,
    global_batch_size: int,
    image_size: int,
    sharding: NamedSharding,
    worker_count: int = 0,
    read_threads: int = READ_THREADS,
    process_index: int | None = None,
    process_count: int | None = None,
    tokenizer: Any = None,
) -> EvalLoader:
    """Evaluation batches of `split_dir`: resize shorter side + central crop to image_size,
    deterministic order, last batch padded; same keys as training plus `mask` bool [B] (with a
    `tokenizer`: the first caption's tokens). `sharding`: as for `train_loader`."""
    return EvalLoader(
        split_dir,
        global_batch_size=global_batch_size,
        image_size=image_size,
        sharding=sharding,
        worker_count=worker_count,
        read_threads=read_threads,
        process_index=process_index,
        process_count=process_count,
        tokenizer=tokenizer,
    )
