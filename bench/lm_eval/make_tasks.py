"""Write lm-evaluation-harness tasks from herd's demo eval data (demo/data/eval.json).

    python bench/lm_eval/make_tasks.py demo/data/eval.json OUT_DIR

Two tasks over the Alpaca prompt of each record (the prompt herd and train.py train on):
- herd_demo_choice (multiple_choice, log-likelihoods): "first word" records choose among the
  input's words, "count words" records among 1..8; acc and acc_norm.
- herd_demo_generate (generate_until, greedy): every record, exact match of the answer.
"""
import json
import os
import sys

WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
              "further context. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def prompt(rec):
    return (WITH_INPUT if rec.get("input") else NO_INPUT).format(**rec)


def main(src, out):
    recs = json.load(open(src))
    os.makedirs(out, exist_ok=True)
    choice, gen = [], []
    for r in recs:
        gen.append({"prompt": prompt(r), "output": r["output"]})
        if r["task"] == "first_word":
            options = r["input"].split()
        elif r["task"] == "count_words":
            options = [str(i) for i in range(1, 9)]
        else:
            continue
        # As train.py joins them: the answer follows "### Response:" with no space.
        choice.append({"prompt": prompt(r), "choices": options,
                       "gold": options.index(r["output"])})
    for name, rows in [("choice", choice), ("generate", gen)]:
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    data = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                         f"    test: {os.path.abspath(os.path.join(out, name + '.jsonl'))}\n"
                         f"test_split: test\n")
    with open(os.path.join(out, "herd_demo_choice.yaml"), "w") as f:
        f.write("task: herd_demo_choice\n" + data("choice") +
                "output_type: multiple_choice\ndoc_to_text: \"{{prompt}}\"\n"
                "doc_to_choice: \"{{choices}}\"\ndoc_to_target: gold\ntarget_delimiter: \"\"\n"
                "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    with open(os.path.join(out, "herd_demo_generate.yaml"), "w") as f:
        f.write("task: herd_demo_generate\n" + data("generate") +
                "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\n"
                "doc_to_target: \"{{output}}\"\n"
                "generation_kwargs:\n  until: [\"</s>\"]\n  max_gen_toks: 24\n  do_sample: false\n"
                "filter_list:\n  - name: strip\n    filter:\n      - function: remove_whitespace\n"
                "      - function: take_first\n"
                "metric_list:\n  - metric: exact_match\n")
    print(f"{len(choice)} multiple-choice and {len(gen)} generation records in {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
