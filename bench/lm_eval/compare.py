"""Compare two lm-eval --log_samples runs of the same tasks, sample by sample:
the log-likelihood of every choice (multiple_choice) and the generated text (generate_until).

    python bench/lm_eval/compare.py RUN_A_DIR RUN_B_DIR
"""
import glob
import json
import sys


def samples(d):
    out = {}
    for f in glob.glob(f"{d}/**/samples_*.jsonl", recursive=True):
        task = f.split("samples_")[1].rsplit("_", 1)[0]
        for line in open(f):
            s = json.loads(line)
            out[(task, s["doc_id"])] = s["resps"]
    return out


a, b = samples(sys.argv[1]), samples(sys.argv[2])
if not a or a.keys() != b.keys():
    sys.exit(f"different samples: {len(a)} vs {len(b)}")
worst, lls, texts, same_text = 0.0, 0, 0, 0
for k in a:
    for ra, rb in zip(a[k], b[k]):
        x, y = ra[0], rb[0]
        if isinstance(x, list):  # [log-likelihood, is_greedy]
            worst = max(worst, abs(float(x[0]) - float(y[0])))
            lls += 1
        else:
            texts += 1
            same_text += x == y
print(f"{lls} log-likelihoods: max |a - b| = {worst:.3g}; "
      f"{same_text} of {texts} generations identical")
