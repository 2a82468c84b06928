"""Concurrent load on `herd serve`: N requests at once to /v1/generate; prints requests/s and tokens/s.
Usage: python3 bench/serve_load.py ADDR TOKEN N   (e.g. 127.0.0.1:8080 "$(cat .herd-serve/token)" 32)"""
import json, sys, threading, time, urllib.request
addr, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = lambda i: json.dumps({"instruction": "Repeat the words.", "input": f"cat dog sun {i}", "max_new_tokens": 32}).encode()
toks = []
def one(i):
    r = urllib.request.Request(f"http://{addr}/v1/generate", data=body(i), headers={"Authorization": "Bearer " + token})
    toks.append(json.load(urllib.request.urlopen(r))["usage"]["completion_tokens"])
t0 = time.time()
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
dt = time.time() - t0
print(f"{n} requests, {sum(toks)} tokens in {dt:.2f}s: {n/dt:.1f} req/s, {sum(toks)/dt:.0f} tokens/s")
