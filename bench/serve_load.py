"""Concurrent load on `herd serve`: requests sent at once to /v1/generate; prints requests/s,
tokens/s and the latency of each kind of request.

Usage: python3 bench/serve_load.py ADDR TOKEN N [LONG LONG_TOKENS SHORT_TOKENS]
  N requests of 32 tokens at most (e.g. 127.0.0.1:8080 "$(cat .herd-serve/token)" 32), or with
  the last three: N short requests of SHORT_TOKENS and LONG of LONG_TOKENS, all sent together
  (use a model that does not stop early, such as the untrained demo/model)."""
import json, sys, threading, time, urllib.request

addr, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
long_n, long_tokens, short_tokens = (int(a) for a in sys.argv[4:7]) if len(sys.argv) > 4 else (0, 0, 32)
# Interleaved, so long and short requests arrive mixed.
order = []
li, si = 0, 0
while li < long_n or si < n:
    if li < long_n:
        order.append("long"); li += 1
    for _ in range(max(1, n // max(1, long_n))):
        if si < n:
            order.append("short"); si += 1
results = []  # (kind, seconds, tokens)


def one(i, kind):
    limit = long_tokens if kind == "long" else short_tokens
    body = json.dumps({"instruction": "Repeat the words.", "input": f"cat dog sun {i}",
                       "max_new_tokens": limit}).encode()
    r = urllib.request.Request(f"http://{addr}/v1/generate", data=body,
                               headers={"Authorization": "Bearer " + token})
    t = time.time()
    got = json.load(urllib.request.urlopen(r))["usage"]["completion_tokens"]
    results.append((kind, time.time() - t, got))


t0 = time.time()
ts = [threading.Thread(target=one, args=(i, k)) for i, k in enumerate(order)]
[t.start() for t in ts]
[t.join() for t in ts]
dt = time.time() - t0
total = sum(r[2] for r in results)
print(f"{len(order)} requests, {total} tokens in {dt:.2f}s: {len(order)/dt:.1f} req/s, {total/dt:.0f} tokens/s")
for kind in ("short", "long"):
    lat = sorted(r[1] for r in results if r[0] == kind)
    if lat:
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
        print(f"  {kind}: {len(lat)} requests, latency mean {sum(lat)/len(lat):.2f}s p50 {p(0.5):.2f}s p95 {p(0.95):.2f}s")
