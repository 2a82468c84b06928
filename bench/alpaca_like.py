#!/usr/bin/env python3
"""Alpaca-like training data for the demo model: records of the demo's "repeat" task whose
token lengths follow a log-normal around ~150 tokens with a tail cut at 512 (Alpaca's shape:
mean ~150), the distribution worker/src/data/pack.rs uses for its padding fractions.

    python3 bench/alpaca_like.py demo/data/train.json N > alpaca_like.json

Words come from the demo train data; a word is ~TOKENS_PER_WORD tokens of the demo tokenizer
and the Alpaca template ~TEMPLATE tokens (calibrated with `herd data preview`).
"""
import json
import math
import random
import sys

TEMPLATE = 45
TOKENS_PER_WORD = 1.0

src, n = sys.argv[1], int(sys.argv[2])
words = sorted({w for r in json.load(open(src)) for w in (r.get("input", "") + " " + r["output"]).split() if w.isalpha()})
rng = random.Random(42)
out = []
for _ in range(n):
    length = min(512, max(20, round(math.exp(4.8 + 0.6 * rng.gauss(0, 1)))))
    k = max(1, round((length - TEMPLATE) / (2 * TOKENS_PER_WORD)))
    text = " ".join(rng.choice(words) for _ in range(k))
    out.append({"instruction": "Repeat the words.", "input": text, "output": text})
json.dump(out, sys.stdout, indent=0)
