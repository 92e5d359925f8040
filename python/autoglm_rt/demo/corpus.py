"""The demo's corpus: the source text of the Python standard library of the running interpreter.

Present on every machine that can run the demo, real text, and chosen deterministically: the
top-level ``*.py`` files of the stdlib directory, ordered by name; every tenth file (by that
order) is held out for validation, so no validation text is ever trained on. Characters are
mapped to bytes 0..127 (anything else becomes ``?``), so the vocabulary is fixed at 128.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOCAB_SIZE = 128
HELD_OUT_EVERY = 10


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint8 token ids
    val: np.ndarray
    files: tuple[str, ...]  # names of the files used, in order

    def describe(self) -> str:
        return f"{len(self.files)} stdlib files, {self.train.size:,} train / {self.val.size:,} val characters"


def stdlib_files(stdlib: str | Path | None = None) -> list[Path]:
    """The top-level ``*.py`` files of the standard library, sorted by name."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Python source files under {root}; the demo needs the stdlib sources")
    return files


def encode(text: str) -> np.ndarray:
    """ASCII code points as uint8; other characters become '?'."""
    data = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)
    return np.where(data < VOCAB_SIZE, data, ord("?")).astype(np.uint8)


def decode(tokens: np.ndarray) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("ascii")


def load_corpus(max_chars: int = 4_000_000, stdlib: str | Path | None = None) -> Corpus:
    """Reads files in order until ``max_chars`` characters are collected (train and val
    together). The same interpreter always yields the same corpus."""
    if max_chars < 10_000:
        raise ValueError(f"max_chars: expected at least 10000 characters, got {max_chars}")
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    used: list[str] = []
    total = 0
    for i, path in enumerate(stdlib_files(stdlib)):
        tokens = encode(path.read_text(encoding="utf-8", errors="replace"))
        (val_parts if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train_parts).append(tokens)
        used.append(path.name)
        total += tokens.size
        if total >= max_chars:
            break
    if not val_parts:
        raise ValueError("the stdlib is too small to hold out a validation split")
    return Corpus(np.concatenate(train_parts), np.concatenate(val_parts), tuple(used))


def sample_batch(data: np.ndarray, batch: int, block: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` random windows of ``block`` tokens and their next-token targets (int64)."""
    starts = rng.integers(0, data.size - block - 1, size=batch)
    idx = starts[:, None] + np.arange(block)[None, :]
    return data[idx].astype(np.int64), data[idx + 1].astype(np.int64)
