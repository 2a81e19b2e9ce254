#!/usr/bin/env python3
"""Sustained-load check of a running `talaria serve`: C concurrent clients send chat completions
back to back for D seconds; prints requests/s, generated tokens/s and latency percentiles (and, with
--stream, time to first token).

Usage: python3 scripts/serve_load.py http://127.0.0.1:8080 --clients 8 --seconds 20 --max-tokens 64
Standard library only; loopback servers only (it refuses other hosts).
"""

import argparse
import http.client
import json
import threading
import time
import urllib.parse


def client(url, body, deadline, out, lock):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    i = 0
    while time.monotonic() < deadline:
        i += 1
        req = dict(body, seed=hash((threading.get_ident(), i)) & 0x7FFFFFFF)
        t = time.monotonic()
        conn.request("POST", "/v1/chat/completions", json.dumps(req), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        tokens, first = None, None
        if resp.status != 200:
            resp.read()
        elif req.get("stream"):
            for line in resp:
                data = line.decode().strip().removeprefix("data: ")
                if not data or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    first = time.monotonic() - t
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        else:
            tokens = json.loads(resp.read())["usage"]["completion_tokens"]
        with lock:
            out.append((time.monotonic() - t, tokens, first))
    conn.close()


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--stream", action="store_true", help="stream answers and report time to first token")
    a = ap.parse_args()
    host = urllib.parse.urlsplit(a.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load a non-loopback host {host!r}")
    body = {
        "messages": [{"role": "user", "content": "Tell me something about the sea."}],
        "max_tokens": a.max_tokens,
        "temperature": a.temperature,
    }
    if a.stream:
        body.update(stream=True, stream_options={"include_usage": True})
    out, lock = [], threading.Lock()
    start = time.monotonic()
    deadline = start + a.seconds
    threads = [threading.Thread(target=client, args=(a.url, body, deadline, out, lock)) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    ok = [o for o in out if o[1] is not None]
    failed = len(out) - len(ok)
    if not ok:
        raise SystemExit(f"no request succeeded ({failed} failed)")
    lat = [o[0] for o in ok]
    tokens = sum(o[1] for o in ok)
    print(
        f"clients {a.clients}, {wall:.1f} s (last requests finish after the {a.seconds:.0f} s window), "
        f"max_tokens {a.max_tokens}, temperature {a.temperature}, {'streaming' if a.stream else 'whole answers'}"
    )
    print(f"requests {len(ok)} ok, {failed} failed; {len(ok) / wall:.2f} requests/s; {tokens / wall:.0f} generated tokens/s")
    print(f"latency p50 {percentile(lat, 50):.3f} s, p95 {percentile(lat, 95):.3f} s, max {max(lat):.3f} s")
    ttft = [o[2] for o in ok if o[2] is not None]
    if ttft:
        print(f"time to first token p50 {percentile(ttft, 50):.3f} s, p95 {percentile(ttft, 95):.3f} s")


if __name__ == "__main__":
    main()
