#!/usr/bin/env bash
# `paged serve` against the offline engine on the CPU, same workload, taking turns (this machine's speed
# swings within minutes, so rounds alternate and each is reported):
#   benchmarks/cpu_serve.sh OUTDIR [ROUNDS] [STREAMS]
# Workload: STREAMS (default 32) requests of 128 random token ids in, 128 out, EOS ignored, all in flight at
# once, on the default model (SmolLM2-135M-Instruct, dtype auto). Offline = benchmarks/throughput.py (prefix
# cache cleared each round); online = benchmarks/serve.py against `paged serve` with a fresh seed each round,
# so no round hits the prefix cache of the one before.
set -uo pipefail
OUT=${1:?usage: benchmarks/cpu_serve.sh OUTDIR [ROUNDS] [STREAMS]}
ROUNDS=${2:-3}
STREAMS=${3:-32}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
port=8190
python3 -m paged.cli.main serve --port $port --host 127.0.0.1 --uvicorn-log-level warning --disable-log-stats \
  >"$OUT/serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' EXIT
for _ in $(seq 240); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 0.5; done
for round in $(seq "$ROUNDS"); do
  python3 benchmarks/throughput.py --num-prompts "$STREAMS" --input-len 128 --output-len 128 --no-compare-hf \
    --seed "$round" 2>>"$OUT/offline.log" | tail -1 | tee -a "$OUT/offline.jsonl"
  python3 benchmarks/serve.py --base-url http://127.0.0.1:$port --num-prompts "$STREAMS" --input-len 128 \
    --output-len 128 --ignore-eos --max-concurrency "$STREAMS" --seed "$round" \
    --result-json "$OUT/online-$round.json" >>"$OUT/online.log" 2>&1
  python3 - "$OUT/offline.jsonl" "$OUT/online-$round.json" <<'EOF'
import json, sys
offline = json.loads(open(sys.argv[1]).read().splitlines()[-1])["paged"]["output_tok_s"]
online = json.load(open(sys.argv[2]))[0]
print(f"round: offline {offline:.1f} tok/s, online {online['output_token_throughput']:.1f} tok/s "
      f"({online['output_token_throughput'] / offline:.2f} of offline), TPOT {online['tpot_ms']['mean']:.1f} ms, "
      f"failed {online['failed']}")
EOF
done
