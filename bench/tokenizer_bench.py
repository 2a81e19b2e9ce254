"""Tokenizer speed, side by side in one run: talaria vs Python `tokenizers` vs `tiktoken`.

Encoding: every tool encodes the lines of the same file (each line with its line break, the unit of
`talaria tokenizer bench`), in a batch on all threads and one line at a time on one thread; the best
of --repeats runs counts. Tokenizers: GPT-2 (from ../shared/data/tokenizer; tiktoken gets the same
ranks and split pattern) and a tokenizer trained by talaria (Python `tokenizers` loads its
tokenizer.json; tiktoken cannot express its digit split, so it is left out there).

Training: `talaria tokenizer train` vs Python `tokenizers` with the same settings (digits split one
by one, then byte-level; the same special tokens; vocab --vocab-size; min frequency 2) on the same
documents (.txt files split at `<|endoftext|>` lines, as talaria reads them).

Usage: python3 bench/tokenizer_bench.py --talaria target/release/talaria [--vocab-size 8192]
       [--repeats 3] [FILES...]   (default: TinyStories head, Tiny Shakespeare, WikiText-2 test)
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import tiktoken
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
DEFAULT_FILES = ["pretrain/tinystories_train_head.txt", "pretrain/tinyshakespeare.txt", "pretrain/wikitext2_test.txt"]
SPECIALS = ["<|endoftext|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def lines_of(text):
    """Like Rust's `split_inclusive('\\n')`."""
    parts = text.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def documents_of(text, sep="<|endoftext|>"):
    """talaria's .txt reader: documents between separator lines, minus the line break before each."""
    docs, cur = [], []
    for line in lines_of(text):
        if line.strip() == sep:
            docs.append("".join(cur))
            cur = []
        else:
            cur.append(line)
    docs.append("".join(cur))
    out = []
    for d in docs:
        if d.endswith("\n"):
            d = d[:-1]
            if d.endswith("\r"):
                d = d[:-1]
        if d.strip():
            out.append(d)
    return out


def best(fn, repeats):
    t = float("inf")
    for _ in range(repeats):
        s = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - s)
    return t


def gpt2_python():
    tok_dir = os.path.join(DATA, "tokenizer")
    vocab_path = os.path.join(tok_dir, "gpt2_vocab.json")
    tok = Tokenizer(models.BPE.from_file(vocab_path, os.path.join(tok_dir, "gpt2_merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.encode_special_tokens = True
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    dec = {chr(c): b for b, c in zip(bs, cs)}
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    ranks = {bytes(dec[c] for c in t): i for t, i in vocab.items() if t != "<|endoftext|>"}
    tt = tiktoken.Encoding("gpt2_local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    return tok, tt


def python_encode(tok, lines, repeats):
    mb = sum(len(l.encode()) for l in lines) / 1e6
    batch = best(lambda: tok.encode_batch_fast(lines, add_special_tokens=False), repeats)
    serial = best(lambda: [tok.encode(l, add_special_tokens=False) for l in lines], repeats)
    return mb / batch, mb / serial


def tiktoken_encode(tt, lines, repeats, threads):
    mb = sum(len(l.encode()) for l in lines) / 1e6
    batch = best(lambda: tt.encode_ordinary_batch(lines, num_threads=threads), repeats)
    serial = best(lambda: [tt.encode_ordinary(l) for l in lines], repeats)
    return mb / batch, mb / serial


def talaria_encode(talaria, tok_path, path, repeats):
    out = subprocess.run([talaria, "tokenizer", "bench", "--tokenizer", tok_path, "--input", path, "--repeats",
                          str(repeats)], check=True, capture_output=True, text=True).stdout
    batch = float(re.search(r"encode_batch ([0-9.]+) MB/s", out).group(1))
    serial = float(re.search(r"one by one ([0-9.]+) MB/s", out).group(1))
    return batch, serial


def python_train(files, vocab_size):
    docs = []
    for p in files:
        with open(p, encoding="utf-8") as f:
            docs.extend(documents_of(f.read()))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[AddedToken(s, special=True) for s in SPECIALS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    s = time.perf_counter()
    tok.train_from_iterator(docs, trainer=trainer)
    return time.perf_counter() - s, tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--talaria", required=True)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    files = a.files or [os.path.join(DATA, f) for f in DEFAULT_FILES]
    threads = os.cpu_count()
    mb_all = sum(os.path.getsize(p) for p in files) / 1e6
    print(f"machine: {threads} cores; Python tokenizers, tiktoken {tiktoken.__version__}")

    with tempfile.TemporaryDirectory() as tmp:
        trained = os.path.join(tmp, "trained.json")
        s = time.perf_counter()
        out = subprocess.run([a.talaria, "tokenizer", "train", "--input", *files, "--vocab-size", str(a.vocab_size),
                              "--out", trained], check=True, capture_output=True, text=True).stdout
        t_command = time.perf_counter() - s
        t_talaria = float(re.search(r" MB in ([0-9.]+)s", out).group(1))
        t_python, _ = python_train(files, a.vocab_size)
        print(f"\n## training, vocab {a.vocab_size}, {mb_all:.2f} MB ({len(files)} files)")
        print(f"talaria: {t_talaria:.2f} s reading + training ({t_command:.2f} s for the whole command, which also "
              f"loads, saves and re-encodes the corpus to report compression)")
        print(f"Python tokenizers train_from_iterator (same documents, already in memory): {t_python:.2f} s")

        gpt2_py, tt = gpt2_python()
        gpt2_path = os.path.join(tmp, "gpt2.json")
        subprocess.run([a.talaria, "tokenizer", "import-gpt2", "--vocab", os.path.join(DATA, "tokenizer", "gpt2_vocab.json"),
                        "--merges", os.path.join(DATA, "tokenizer", "gpt2_merges.txt"), "--out", gpt2_path],
                       check=True, capture_output=True)
        trained_py = Tokenizer.from_file(trained)
        trained_py.encode_special_tokens = True
        print(f"\n## encoding throughput, MB/s (batch on {threads} threads / one line at a time), best of {a.repeats}")
        print("| file | MB | tokenizer | talaria | Python tokenizers | tiktoken |")
        print("| --- | --- | --- | --- | --- | --- |")
        for p in files:
            with open(p, encoding="utf-8") as f:
                lines = lines_of(f.read())
            mb = sum(len(l.encode()) for l in lines) / 1e6
            name = os.path.basename(p)
            r = talaria_encode(a.talaria, gpt2_path, p, a.repeats)
            py = python_encode(gpt2_py, lines, a.repeats)
            ti = tiktoken_encode(tt, lines, a.repeats, threads)
            print(f"| {name} | {mb:.2f} | GPT-2 | {r[0]:.1f} / {r[1]:.1f} | {py[0]:.1f} / {py[1]:.1f} | {ti[0]:.1f} / {ti[1]:.1f} |")
            r = talaria_encode(a.talaria, trained, p, a.repeats)
            py = python_encode(trained_py, lines, a.repeats)
            print(f"| {name} | {mb:.2f} | trained {a.vocab_size} | {r[0]:.1f} / {r[1]:.1f} | {py[0]:.1f} / {py[1]:.1f} | n/a |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
