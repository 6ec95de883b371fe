#!/usr/bin/env python3
"""Convert scikit-learn's digits.csv.gz into four gzipped IDX files for peerless's `digits` dataset.

Usage:
    pip download scikit-learn --no-deps -d /tmp/skl
    cd /tmp/skl && python3 -m zipfile -e scikit_learn-*.whl skl
    python3 scripts/make_digits_idx.py /tmp/skl/skl/sklearn/datasets/data/digits.csv.gz \
        crates/peerless-ml/data/digits

Input: 1,797 rows of 65 comma-separated integers: 64 pixels (8x8, row-major, 0..16), then
the label 0..9.

Output (standard MNIST file names, gzip with mtime 0 so the bytes are reproducible):
    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

Pixels are rescaled 0..16 -> 0..255 as round(v * 255 / 16), so the same u8 IDX loader (which
divides by 255) handles digits, MNIST and Fashion-MNIST alike.

Split (fixed, no randomness): stratified by class. Within each class, samples are taken in
file order and every 5th one (the 5th, 10th, 15th, ... of that class) goes to the test set,
the rest to train. That is ~20% test in every class. Both sets keep file order.

Only the standard library is used (gzip, csv, struct). After regenerating, update the
SHA-256 constants in crates/peerless-ml/src/data/catalog.rs (they are of the decompressed
IDX bytes); `sha256sum` of `zcat FILE` prints them.
"""

import csv
import gzip
import io
import os
import struct
import sys

ROWS, COLS, CLASSES = 8, 8, 10
TEST_EVERY = 5


def read_rows(path):
    with gzip.open(path, "rt", newline="") as f:
        rows = [[int(v) for v in row] for row in csv.reader(f) if row]
    for i, row in enumerate(rows):
        if len(row) != ROWS * COLS + 1:
            sys.exit(f"row {i}: expected {ROWS * COLS + 1} columns, got {len(row)}")
        if not all(0 <= v <= 16 for v in row[:-1]):
            sys.exit(f"row {i}: pixel outside 0..16")
        if not 0 <= row[-1] < CLASSES:
            sys.exit(f"row {i}: label {row[-1]} outside 0..{CLASSES - 1}")
    return rows


def split(rows):
    seen = [0] * CLASSES
    train, test = [], []
    for row in rows:
        label = row[-1]
        seen[label] += 1
        (test if seen[label] % TEST_EVERY == 0 else train).append(row)
    return train, test


def idx_images(rows):
    out = io.BytesIO()
    out.write(struct.pack(">IIII", 0x00000803, len(rows), ROWS, COLS))
    for row in rows:
        out.write(bytes((v * 255 + 8) // 16 for v in row[:-1]))
    return out.getvalue()


def idx_labels(rows):
    return struct.pack(">II", 0x00000801, len(rows)) + bytes(row[-1] for row in rows)


def write_gz(path, data):
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
            f.write(data)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out_dir = sys.argv[1], sys.argv[2]
    rows = read_rows(src)
    train, test = split(rows)
    os.makedirs(out_dir, exist_ok=True)
    for prefix, part in (("train", train), ("t10k", test)):
        write_gz(os.path.join(out_dir, f"{prefix}-images-idx3-ubyte.gz"), idx_images(part))
        write_gz(os.path.join(out_dir, f"{prefix}-labels-idx1-ubyte.gz"), idx_labels(part))
    print(f"{len(rows)} rows -> {len(train)} train, {len(test)} test in {out_dir}")


if __name__ == "__main__":
    main()
