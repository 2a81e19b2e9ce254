"""PyTorch eager reference for `talaria bench train|decode`.

The same GPT-2 model (preset `bench`: vocab 8192, context 256, 6 layers, 6 heads, width 384),
batch 8x256 of random tokens, AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices
only), global-norm clipping at 1.0 and the thread count of the Rust side (2), printing the same
figures and, with --json, one JSON object with the same keys on the last line.

    python3 bench/pytorch_reference.py train --json
    python3 bench/pytorch_reference.py decode --json

On a GPU (scripts/gpu_check.sh): `train --preset gpt2 --device cuda --dtype bf16 [--compile]`, bf16
autocast with f32 weights and optimizer state, the reference for `talaria bench train --device cuda
--dtype bf16`.
"""

import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "test": dict(vocab=512, ctx=64, width=32, layers=2, heads=4),
    "bench": dict(vocab=8192, ctx=256, width=384, layers=6, heads=6),
    "gpt2": dict(vocab=50257, ctx=1024, width=768, layers=12, heads=12),
}


class Block(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.h = h
        self.ln_1 = nn.LayerNorm(c, eps=1e-5)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c, eps=1e-5)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x, cache=None, pos=0):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # A preallocated cache written in place, as on the Rust side.
            kc, vc = cache
            kc[:, :, pos : pos + t] = k
            vc[:, :, pos : pos + t] = v
            k, v = kc[:, :, : pos + t], vc[:, :, : pos + t]
            if t == 1:
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                mask = torch.ones(t, pos + t, dtype=torch.bool).tril(diagonal=pos)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p
        self.wte = nn.Embedding(p["vocab"], p["width"])
        self.wpe = nn.Embedding(p["ctx"], p["width"])
        self.h = nn.ModuleList(Block(p["width"], p["heads"]) for _ in range(p["layers"]))
        self.ln_f = nn.LayerNorm(p["width"], eps=1e-5)
        for name, w in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(w)
            elif w.dim() >= 2:
                std = 0.02 / math.sqrt(2 * p["layers"]) if "proj.weight" in name else 0.02
                nn.init.normal_(w, 0.0, std)

    def forward(self, idx, caches=None, pos=0):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(pos, pos + t, device=idx.device))
        for i, blk in enumerate(self.h):
            x = blk(x, None if caches is None else caches[i], pos)
        return self.ln_f(x) @ self.wte.weight.t()


def forward_flops_per_token(p, attended):
    c, l, v = p["width"], p["layers"], p["vocab"]
    return 2.0 * (l * 12 * c * c + c * v) + l * 4.0 * c * attended


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_matmul_gflops(device, dtype):
    n = 1024 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["train", "decode"])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="train: bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="train: torch.compile the model")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    p = PRESETS[a.preset]
    device = torch.device(a.device)
    assert a.what == "train" or device.type == "cpu", "decode runs on the CPU only"
    amp = torch.bfloat16 if a.dtype == "bf16" else None
    peak = peak_matmul_gflops(device, amp or torch.float32)
    model = GPT(p).to(device)
    step_model = torch.compile(model) if a.compile else model
    if a.what == "train":
        steps = a.steps or 5
        decay = [w for w in model.parameters() if w.dim() >= 2]
        other = [w for w in model.parameters() if w.dim() < 2]
        opt = torch.optim.AdamW(
            [dict(params=decay, weight_decay=0.1), dict(params=other, weight_decay=0.0)],
            lr=3e-4,
            betas=(0.9, 0.95),
            eps=1e-8,
        )
        b, t = a.batch, p["ctx"]
        times = []
        # With --compile the first steps compile; they are left out of the timing.
        warmup = 3 if a.compile else 1
        for step in range(steps + warmup):
            data = torch.randint(0, p["vocab"], (b, t + 1), device=device)
            x, y = data[:, :-1], data[:, 1:]
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = step_model(x)
                loss = F.cross_entropy(logits.reshape(-1, p["vocab"]).float(), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sync(device)
            if step >= warmup:
                times.append(time.perf_counter() - start)
        step_s = sorted(times)[len(times) // 2] if len(times) % 2 else 0.5 * sum(sorted(times)[len(times) // 2 - 1 : len(times) // 2 + 1])
        tokens_per_s = b * t / step_s
        gflops = 3.0 * forward_flops_per_token(p, t) * tokens_per_s / 1e9
    else:
        steps = a.steps or 200
        prompt_len = 16
        assert prompt_len + steps < p["ctx"], "prompt plus decoded tokens must fit the context"
        model.eval()
        hd = p["width"] // p["heads"]
        with torch.inference_mode():
            caches = [
                (torch.zeros(1, p["heads"], p["ctx"], hd), torch.zeros(1, p["heads"], p["ctx"], hd))
                for _ in range(p["layers"])
            ]
            prompt = torch.tensor([[(i * 7919) % p["vocab"] for i in range(prompt_len)]])
            logits = model(prompt, caches, 0)
            nxt = logits[0, -1].argmax().view(1, 1)
            pos = prompt_len
            stamps = [time.perf_counter()]
            for _ in range(steps):
                logits = model(nxt, caches, pos)
                pos += 1
                nxt = logits[0, -1].argmax().view(1, 1)
                int(nxt)
                stamps.append(time.perf_counter())
        times = [b - a_ for a_, b in zip(stamps, stamps[1:])]
        tokens_per_s = len(times) / sum(times)
        step_s = sorted(times)[len(times) // 2]
        gflops = forward_flops_per_token(p, prompt_len + steps // 2) * tokens_per_s / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"tokens/s            {tokens_per_s:.1f}")
    print(f"achieved GFLOP/s    {gflops:.1f} ({100 * gflops / peak:.0f}% of the {peak:.1f} GFLOP/s of one 1024^3 matmul)")
    print(f"peak RSS            {rss:.0f} MiB")
    print(f"median step         {1e3 * step_s:.2f} ms")
    if a.json:
        print(json.dumps(dict(
            impl="pytorch" + ("+compile" if a.compile else ""), kind=a.what, preset=a.preset,
            threads=torch.get_num_threads(), device=a.device, dtype=a.dtype,
            tokens_per_s=tokens_per_s, gflops=gflops, peak_matmul_gflops=peak,
            peak_rss_mib=rss, median_step_s=step_s,
        )))


if __name__ == "__main__":
    main()
