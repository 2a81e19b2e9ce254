#!/usr/bin/env python3
"""Mean pairwise cosine similarity of the token embeddings of the ten digits and of the 26 lower-case
letters in a Talaria checkpoint: the measurement behind "Digit names in the pretraining corpus" in
docs/tuning-history.md.

Usage: python3 scripts/embedding_cosine.py CHECKPOINT_DIR [CHECKPOINT_DIR...]
Needs numpy. Reads CHECKPOINT_DIR/model.safetensors and CHECKPOINT_DIR/tokenizer.json.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np


def wte(path: Path) -> np.ndarray:
    with open(path / "model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        name = next(k for k in header if k.endswith("wte.weight"))
        meta = header[name]
        if meta["dtype"] != "F32":
            sys.exit(f"{path}: {name} is {meta['dtype']}, expected F32")
        start, end = meta["data_offsets"]
        f.seek(8 + n + start)
        return np.frombuffer(f.read(end - start), dtype=np.float32).reshape(meta["shape"])


def mean_cosine(rows: np.ndarray) -> float:
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    sims = unit @ unit.T
    return float(sims[np.triu_indices(len(rows), 1)].mean())


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        path = Path(arg)
        path = path / "checkpoint" if (path / "checkpoint").is_dir() else path
        vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
        w = wte(path)
        for label, chars in [("digits", "0123456789"), ("letters", "abcdefghijklmnopqrstuvwxyz")]:
            missing = [c for c in chars if c not in vocab]
            if missing:
                sys.exit(f"{path}: the tokenizer has no single-character token for {missing}")
            print(f"{arg}\t{label}\tmean pairwise cosine {mean_cosine(w[[vocab[c] for c in chars]]):.3f}")


if __name__ == "__main__":
    main()
