"""The text tokenizer of LiT: byte-level, with the special tokens and padding defined once here.

    tok = tokenizer.ByteTokenizer.fit(captions, max_len=32)  # checks the caption set
    tokens, mask = tok.encode(["a handwritten seven", ...])  # int32 [N, max_len], bool [N, max_len]
    tok.save(path); tokenizer.load(path).decode(tokens[0])

Byte-level (UTF-8 bytes + 3 specials, vocabulary 259) rather than a trained subword model: it
needs no download and no training artefact beyond its length, handles every language and typo,
and is what the LiT issue allows. `fit` still looks at the run's captions: it rejects an empty
set (a split without text asked for LiT) and picks `max_len` from the caption lengths when not
given (the 99th percentile + BOS/EOS, capped), so that the text tower's sequence is no longer than
the data needs. Sequences are `BOS bytes... EOS PAD...`, truncated to `max_len` (EOS kept).
Picklable: the loader tokenizes in its decode threads / Grain workers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

PAD, BOS, EOS = 0, 1, 2
OFFSET = 3  # byte b is token b + OFFSET
VOCAB_SIZE = 256 + OFFSET
MAX_LEN_CAP = 256


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    max_len: int
    kind: str = "bytes"

    def __post_init__(self):
        if not 3 <= self.max_len <= MAX_LEN_CAP:
            raise ValueError(f"tokenizer max_len={self.max_len} must be in [3, {MAX_LEN_CAP}]")

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @classmethod
    def fit(
        cls, captions: Iterable[str], max_len: int = 0, where: str = "captions"
    ) -> "ByteTokenizer":
        """A tokenizer for these captions; `max_len=0` sizes it from them."""
        lengths = [len(c.encode("utf-8")) for c in captions if c]
        if not lengths:
            raise ValueError(
                f"{where}: no captions to build a tokenizer from "
                "(does the split have a `text` field?)"
            )
        if not max_len:
            max_len = min(MAX_LEN_CAP, int(np.ceil(np.percentile(lengths, 99))) + 2)
        return cls(max(3, max_len))

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.full((len(texts), self.max_len), PAD, np.int32)
        for i, text in enumerate(texts):
            ids = (
                np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)[: self.max_len - 2]
                + OFFSET
            )
            row = np.concatenate([[BOS], ids, [EOS]])
            tokens[i, : len(row)] = row
        return tokens, tokens != PAD

    def decode(self, tokens: Sequence[int]) -> str:
        data = bytes(int(t) - OFFSET for t in tokens if int(t) >= OFFSET)
        return data.decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        Path(path).write_text(
            json.dumps(
                {
                    "kind": self.kind,
                    "max_len": self.max_len,
                    "vocab_size": VOCAB_SIZE,
                    "pad": PAD,
                    "bos": BOS,
                    "eos": EOS,
                },
                indent=2,
            )
            + "\n"
        )


def load(path: Path) -> ByteTokenizer:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read tokenizer ({e})") from None
    if spec.get("kind") != "bytes" or spec.get("vocab_size") != VOCAB_SIZE:
        raise ValueError(f"{path}: not a byte tokenizer of vocabulary {VOCAB_SIZE}: {spec}")
    return ByteTokenizer(int(spec["max_len"]))
