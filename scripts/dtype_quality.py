#!/usr/bin/env python3
"""What half- and quarter-size weights cost in quality, measured through `talaria serve --dtype`:

- perplexity of the default world's validation shard (RUN/data/val_0000.bin) and of TinyStories'
  validation text (../shared/data/pretrain/tinystories_valid_head.txt), in windows of the context,
  from the prompt log-probabilities of `/v1/completions` with `echo` and `max_tokens: 0`;
- the largest difference of those log-probabilities to f32's;
- the share of the held-out chat prompts (RUN/world/eval_heldout_prompts.jsonl) whose greedy
  answer equals f32's.

Usage: python3 scripts/dtype_quality.py RUN [--model ppo] [--windows 24] [--talaria BIN] [--data DIR]
Held-out accuracy per dtype comes from `talaria eval RUN/ppo --prompts RUN/world/eval_heldout_prompts.jsonl --dtype D`.
"""

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import urllib.request

DTYPES = ["f32", "f16", "bf16", "q8"]


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=600))


def shard_tokens(path):
    data = open(path, "rb").read()
    assert data[:8] == b"TLRSHARD", path
    bpt = struct.unpack_from("<I", data, 12)[0]
    fmt = "<%d%s" % ((len(data) - 32) // bpt, "H" if bpt == 2 else "I")
    return list(struct.unpack_from(fmt, data, 32))


def windows(tokens, size, count):
    step = max(size, len(tokens) // count)
    return [tokens[i : i + size] for i in range(0, len(tokens) - size, step)][:count]


class Server:
    def __init__(self, talaria, ckpt, dtype, db):
        self.p = subprocess.Popen(
            [talaria, "serve", ckpt, "--port", "0", "--db", db, "--dtype", dtype],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.p.stdout.readline()
        assert line.startswith("listening on "), line
        self.url = line.split()[2]

    def close(self):
        self.p.terminate()
        self.p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--model", default="ppo")
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=200)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--talaria", default=os.path.join(here, "..", "target", "release", "talaria"))
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data"))
    args = ap.parse_args()
    ckpt = os.path.join(args.run, args.model)
    context = json.load(open(os.path.join(ckpt, "checkpoint", "config.json")))["n_positions"]

    prompts = [json.loads(l) for l in open(os.path.join(args.run, "world", "eval_heldout_prompts.jsonl"))]
    prompts = prompts[: args.prompts]
    results = {}
    for dtype in DTYPES:
        s = Server(args.talaria, ckpt, dtype, os.path.join("/tmp", f"talaria-dtype-{os.getpid()}.sqlite"))
        try:
            texts = {
                "default world val": windows(shard_tokens(os.path.join(args.run, "data", "val_0000.bin")), context, args.windows),
            }
            tiny = os.path.join(args.data, "pretrain", "tinystories_valid_head.txt")
            if os.path.exists(tiny):
                ids = post(f"{s.url}/tokenize", {"prompt": open(tiny).read()[:400000]})["tokens"]
                texts["TinyStories val"] = windows(ids, context, args.windows)
            lps = {}
            for name, ws in texts.items():
                r = post(f"{s.url}/v1/completions", {"prompt": ws, "max_tokens": 0, "echo": True, "logprobs": 0})
                lps[name] = [x for c in sorted(r["choices"], key=lambda c: c["index"]) for x in c["logprobs"]["token_logprobs"][1:]]
            answers = []
            for p in prompts:
                r = post(f"{s.url}/v1/chat/completions", {"messages": p["messages"], "max_tokens": 32, "temperature": 0})
                answers.append(r["choices"][0]["message"]["content"])
            results[dtype] = (lps, answers)
        finally:
            s.close()

    base_lps, base_answers = results["f32"]
    print(f"{'dtype':<6} " + " ".join(f"{'ppl ' + n:>24} {'max |dlogp|':>12}" for n in base_lps) + f" {'greedy = f32':>13}")
    for dtype in DTYPES:
        lps, answers = results[dtype]
        cols = []
        for name, xs in lps.items():
            ppl = math.exp(-sum(xs) / len(xs))
            diff = max(abs(a - b) for a, b in zip(xs, base_lps[name]))
            cols.append(f"{ppl:>24.4f} {diff:>12.2e}")
        same = sum(a == b for a, b in zip(answers, base_answers)) / len(answers)
        print(f"{dtype:<6} " + " ".join(cols) + f" {100 * same:>12.1f}%")
    n = {k: len(v) for k, v in base_lps.items()}
    print(f"({', '.join(f'{k}: {v} tokens' for k, v in n.items())}; {len(prompts)} held-out prompts, 32 greedy tokens)")


if __name__ == "__main__":
    main()
