#!/usr/bin/env bash
# lm-evaluation-harness against `herd serve` (its `local-completions` model: token-id prompts,
# echo + logprobs for log-likelihoods, greedy generation) and, on the same model directory and
# tasks, against transformers (its `hf` model), so the two can be compared side by side.
#
#   bench/lm_eval/run.sh MODEL_DIR [EVAL_JSON] [LIMIT]
#   env: HERD (default target/release/herd, else target/debug/herd), LM_EVAL (default lm_eval;
#        pip install lm-eval), SKIP_HF=1 to leave the transformers run out
#
# Both add the bos token, as train.py's tokenizer does. The tasks come from herd's demo eval data (bench/lm_eval/make_tasks.py); run `herd demo`
# first for a trained MODEL_DIR (demo/output). No network: the data and tokenizer are local.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=$(realpath "$1")
DATA=${2:-demo/data/eval.json}
LIMIT=${3:-}
HERD=${HERD:-$( [ -x target/release/herd ] && echo target/release/herd || echo target/debug/herd )}
LM_EVAL=${LM_EVAL:-lm_eval}
PY=$(dirname "$(command -v "$LM_EVAL")")/python
work=$(mktemp -d)
trap 'kill "$serve_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
"$PY" bench/lm_eval/make_tasks.py "$DATA" "$work/tasks"
limit=()
[ -n "$LIMIT" ] && limit=(--limit "$LIMIT")
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$HERD" serve --model "$MODEL" --listen 127.0.0.1:0 --state-dir "$work/serve" \
  > "$work/serve.out" 2> "$work/serve.log" &
serve_pid=$!
for _ in $(seq 100); do
  addr=$(sed -n 's|^herd serve listening on http://||p' "$work/serve.out")
  [ -n "$addr" ] && break
  sleep 0.2
done
[ -n "$addr" ] || { echo "herd serve did not start:"; cat "$work/serve.log"; exit 1; }

tasks=herd_demo_choice,herd_demo_generate
echo "== lm-eval local-completions -> herd serve ($addr)"
t0=$(date +%s.%N)
OPENAI_API_KEY=$(cat "$work/serve/token") "$LM_EVAL" run --model local-completions \
  --model_args "model=herd,base_url=http://$addr/v1/completions,tokenizer_backend=huggingface,tokenizer=$MODEL,add_bos_token=True,num_concurrent=8,max_retries=1,max_length=512" \
  --tasks "$tasks" --include_path "$work/tasks" "${limit[@]}" --output_path "$work/herd" --log_samples 2>&1 \
  | grep -E '^\|' || { cat "$work/serve.log" | tail -20; exit 1; }
echo "($(echo "$(date +%s.%N) - $t0" | bc) s)"
if [ -z "${SKIP_HF:-}" ]; then
  echo "== lm-eval hf (transformers, CPU, float32) on the same model"
  t0=$(date +%s.%N)
  "$LM_EVAL" run --model hf --model_args "pretrained=$MODEL,dtype=float32,add_bos_token=True" --device cpu \
    --tasks "$tasks" --include_path "$work/tasks" "${limit[@]}" --batch_size 8 --output_path "$work/hf" --log_samples 2>&1 \
    | grep -E '^\|'
  echo "($(echo "$(date +%s.%N) - $t0" | bc) s)"
  echo "== herd serve vs transformers, sample by sample"
  "$PY" bench/lm_eval/compare.py "$work/herd" "$work/hf"
fi
