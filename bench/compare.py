"""Runs `talaria bench` and bench/pytorch_reference.py alternately (A B A B ...) and prints the
median of each figure and the median of the per-pair Talaria/PyTorch ratios, as a markdown table.

    python3 bench/compare.py train --rounds 5
    python3 bench/compare.py decode --rounds 5

Alternating pairs and taking the median of their ratios cancels most of the drift of a shared
machine's speed, which is larger than the differences measured.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = [("tokens_per_s", "tokens/s"), ("gflops", "GFLOP/s"), ("peak_matmul_gflops", "peak matmul GFLOP/s"), ("peak_rss_mib", "peak RSS (MiB)")]


def run(cmd, env=None):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["train", "decode"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--talaria", default=os.path.join(ROOT, "target/release/talaria"))
    ap.add_argument(
        "--omp-passive",
        action="store_true",
        help="run PyTorch with OMP_WAIT_POLICY=PASSIVE (its OpenMP threads sleep instead of spinning: faster on a loaded machine)",
    )
    a = ap.parse_args()
    torch_env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if a.omp_passive else None
    steps = ["--steps", str(a.steps)] if a.steps else []
    rust = [a.talaria, "bench", a.what, "--json"] + steps
    torch = [sys.executable, os.path.join(ROOT, "bench/pytorch_reference.py"), a.what, "--json"] + steps
    pairs = []
    for i in range(a.rounds):
        r, t = run(rust), run(torch, torch_env)
        pairs.append((r, t))
        print(f"round {i + 1}: talaria {r['tokens_per_s']:.1f} tokens/s, pytorch {t['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    label_t = "PyTorch eager, OMP passive" if a.omp_passive else "PyTorch eager"
    print(f"| {a.what} ({a.rounds} alternating rounds) | Talaria (median) | {label_t} (median) | Talaria / PyTorch (median of rounds) |")
    print("| --- | --- | --- | --- |")
    for key, label in KEYS:
        rs = [r[key] for r, _ in pairs]
        ts = [t[key] for _, t in pairs]
        ratio = statistics.median(r / t for r, t in zip(rs, ts))
        print(f"| {label} | {statistics.median(rs):.1f} | {statistics.median(ts):.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
