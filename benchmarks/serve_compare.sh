#!/usr/bin/env bash
# lfm2 serve and llama-server side by side on the same weights: one server at a time, in alternating order over
# ROUNDS rounds (the machine's speed drifts from minute to minute; alternating spreads the drift over both), each
# measured by serve_bench.py with the same prompts and lengths. Prints one line per server and round.
#
#   benchmarks/serve_compare.sh CHECKPOINT_DIR MODEL.gguf [ROUNDS=2] [lfm2 serve options...]
#   benchmarks/serve_compare.sh /tmp/LFM2-350M /tmp/lfm2-peers/LFM2-350M-q8_0-vocab.gguf 2 --quantize int8
#
# LLAMA_SERVER (default /tmp/lfm2-peers/llama-server) is the binary benchmarks/peers/server-setup links;
# STREAMS (default 1,8), PROMPT (128) and TOKENS (64) go to serve_bench.py.
set -eu
CKPT=$1; GGUF=$2; ROUNDS=${3:-2}; shift $(($# < 3 ? $# : 3))
HERE=$(cd "$(dirname "$0")" && pwd)
LLAMA=${LLAMA_SERVER:-/tmp/lfm2-peers/llama-server}
BENCH=(python "$HERE/serve_bench.py" --streams "${STREAMS:-1,8}" --prompt-tokens "${PROMPT:-128}" --max-tokens "${TOKENS:-64}")

wait_for() { # URL: until it answers, at most 3 minutes
  for _ in $(seq 180); do curl -sf "$1" >/dev/null && return 0; sleep 1; done
  echo "no answer from $1" >&2; return 1
}
rows() { grep '^| [0-9]' | sed 's/^/  /'; }

llama() {
  "$LLAMA" -m "$GGUF" --parallel 8 -c 8192 -t 2 --port 8081 >/tmp/serve_compare-llama.log 2>&1 &
  local pid=$!
  wait_for http://127.0.0.1:8081/health
  echo "llama-server --parallel 8 (round $1):"; "${BENCH[@]}" --url http://127.0.0.1:8081 | rows
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
ours() {
  lfm2 serve "$CKPT" --parallel 8 --port 8080 --quiet "$@" >/tmp/serve_compare-lfm2.log 2>&1 &
  local pid=$!
  wait_for http://127.0.0.1:8080/v1/models
  echo "lfm2 serve --parallel 8 $* (round $ROUND):"; "${BENCH[@]}" --url http://127.0.0.1:8080 | rows
  kill -INT "$pid"; wait "$pid" 2>/dev/null || true
}
echo "| streams | prompt tok | tokens/stream | aggregate tok/s | all decoding tok/s | stream tok/s (median) | TTFT median s | TTFT max s | TTFT, N-1 busy s |"
for ROUND in $(seq "$ROUNDS"); do
  if [ $((ROUND % 2)) = 1 ]; then llama "$ROUND"; ours "$@"; else ours "$@"; llama "$ROUND"; fi
done
