#!/usr/bin/env bash
# Everything the CUDA backend must show, checked and timed in one call on the GPU machine:
#   benchmarks/gpu.sh OUTDIR [PARTS]
# PARTS (comma-separated, default all): checks (kernels at full size + greedy-vs-transformers tests),
# conformance (tests/backends on this machine's backends, writing matrix-cuda.json for COMPATIBILITY.md),
# peers (ceilings, transformers generate / generate_batch), w1, single, w2, w1-8b, single-8b, w2-8b,
# profile, serve (paged serve against the offline engine on the same model, for each API_SERVERS count),
# serve-hf (`transformers serve` with continuous batching, and paged on the same chat workload),
# quant-kernels, fp8-w1-8b, fp8-single-8b, awq-single-8b, awq-w1-8b, gptq-single-8b, long-8b, long-8b-fp8kv,
# awq-single-70b, awq-w1-70b (quantized weights and the FP8 KV cache), moe-kernel, w1-mixtral, single-mixtral,
# w1-mixtral-fp8, single-mixtral-fp8 (experts quantized to FP8 at load),
# w1-qwen3-moe, single-qwen3-moe (mixture of experts), long (1B, 64 x 7,680 in / 512 out),
# attention-sweep (decode/prefill attention by tiles, launch order and splits against the ceilings),
# profile-long, profile-single-8b (where the steps' milliseconds go), startup (import times, start-up to the
# first token twice, then a cProfile of it with a warm Triton cache), spec-tests, spec-single, spec-batches,
# spec-8b, spec-sharp (speculative decoding: GPU tests; n-gram / oracle / draft-model single streams and batches against
# none), structured-1b (64 JSON-schema requests against the same 64 unconstrained; needs
# .bench/smollm2-tokenizer: a shape has no tokenizer).
# Every log and result lands in OUTDIR: results.jsonl (one JSON line per measurement),
# summary.md (the table for RESULTS.md), and a log per part group.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu.sh OUTDIR [PARTS]}
PARTS=${2:-checks,conformance,peers,w1,single,w2,w1-8b,single-8b,w2-8b,profile}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Bytecode where Python may write it: the machine's packages and the wheels below come without .pyc files, and
# compiling every module again would add seconds to each process's start-up that no installed copy pays.
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/paged-pycache}
unset PYTHONDONTWRITEBYTECODE
RESULTS="$OUT/results.jsonl"
want() { [[ ",$PARTS," == *",$1,"* ]]; }

# The GPU machine has torch, triton and transformers but no network: the project's other needs come
# along as wheels in .whl/ (benchmarks/fetch_wheels.sh fetches them).
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/paged-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/paged-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
{ nvidia-smi; python3 -c 'import torch, triton, transformers, sys; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "python", sys.version.split()[0])'; python3 -m paged.cli.main info; } >>"$OUT/setup.log" 2>&1
tail -4 "$OUT/setup.log"

bench() {  # name, then throughput.py arguments
  local name=$1; shift
  echo "== $name: $*"
  python3 benchmarks/throughput.py "$@" --no-compare-hf 2>>"$OUT/bench.log" | tail -1 | \
    python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['name']='$name'; print(json.dumps(r))" | tee -a "$RESULTS"
}
peer() {  # name, then a peer script and its arguments; its JSON lines go to results.jsonl tagged with name
  local name=$1; shift
  echo "== $name: $*"
  python3 "$@" 2>>"$OUT/peers.log" | grep '^{' | \
    python3 -c "import json,sys; [print(json.dumps({**json.loads(l), 'name': '$name'})) for l in sys.stdin]" | tee -a "$RESULTS"
}

if want checks; then
  python3 benchmarks/kernel_check.py "$OUT" >"$OUT/checks.log" 2>&1; echo "kernel checks exit $?" | tee -a "$OUT/checks.log"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py >>"$OUT/checks.log" 2>&1
  echo "gpu tests exit $?" | tee -a "$OUT/checks.log"; tail -3 "$OUT/checks.log"
fi
if want conformance; then
  PAGED_MATRIX_WHERE="H100 (benchmarks/gpu.sh)" PAGED_MATRIX_OUT="$OUT/matrix-cuda.json" \
    python3 -m pytest -q -p no:cacheprovider tests/backends >"$OUT/conformance.log" 2>&1
  echo "conformance exit $?"; tail -3 "$OUT/conformance.log"
fi
if want peers; then
  peer hf-ceilings-generate .peers/gpu_ceilings_and_hf.py --shapes 1b --batches 256
  peer hf-generate-batch .peers/gpu_peer_bench.py --engine hf --model-size 1b --num-prompts 256 --input-len 512 --output-len 256
fi
want w1 && bench w1-1b --shape 1b --num-prompts 256 --input-len 512 --output-len 256
want single && bench single-1b --shape 1b --num-prompts 1 --input-len 512 --output-len 512
want w2 && bench w2-1b --shape 1b --num-prompts 256 --ranged 100,1024
want w1-8b && bench w1-8b --shape 8b --num-prompts 256 --input-len 512 --output-len 256
want single-8b && bench single-8b --shape 8b --num-prompts 1 --input-len 512 --output-len 512
want w2-8b && bench w2-8b --shape 8b --num-prompts 256 --ranged 100,1024
want long && bench long-1b --shape 1b --num-prompts 64 --input-len 7680 --output-len 512 --max-model-len 8192
if want attention-sweep; then
  (cd benchmarks && python3 attention_sweep.py --out "$OUT" ${SWEEP_ARGS---quick}) >"$OUT/attention-sweep.log" 2>&1
  echo "attention sweep exit $?"; tail -12 "$OUT/attention-sweep.log"
fi
# Mixture of experts (issue 16): the fused kernel at the layer shapes, then the two model shapes end to end.
if want moe-kernel; then
  python3 benchmarks/moe_kernel.py --out "$OUT" >"$OUT/moe-kernel.log" 2>&1; echo "moe kernel exit $?"
  tail -12 "$OUT/moe-kernel.log"
fi
want w1-mixtral && bench w1-mixtral --shape mixtral-8x7b --num-prompts 256 --input-len 512 --output-len 256 \
  --max-model-len 4096
want single-mixtral && bench single-mixtral --shape mixtral-8x7b --num-prompts 1 --input-len 512 --output-len 512 \
  --max-model-len 4096
want w1-mixtral-fp8 && bench w1-mixtral-fp8 --shape mixtral-8x7b --quantization fp8 --num-prompts 256 \
  --input-len 512 --output-len 256 --max-model-len 4096
want single-mixtral-fp8 && bench single-mixtral-fp8 --shape mixtral-8x7b --quantization fp8 --num-prompts 1 \
  --input-len 512 --output-len 512 --max-model-len 4096
want w1-qwen3-moe && bench w1-qwen3-moe --shape qwen3-30b-a3b --num-prompts 256 --input-len 512 --output-len 256 \
  --max-model-len 4096
want single-qwen3-moe && bench single-qwen3-moe --shape qwen3-30b-a3b --num-prompts 1 --input-len 512 \
  --output-len 512 --max-model-len 4096
# Quantization (issue 12): the 8B shape in FP8 (quantized at load) and int4 (AWQ / GPTQ layout, group 128),
# the FP8 KV cache on the long workload against a bf16 one, and the 70B shape in int4 on one GPU.
if want quant-kernels; then
  python3 benchmarks/quant_kernels.py --out "$OUT" >"$OUT/quant-kernels.log" 2>&1; echo "quant kernels exit $?"
fi
want fp8-w1-8b && bench fp8-w1-8b --shape 8b --quantization fp8 --num-prompts 256 --input-len 512 --output-len 256
want fp8-single-8b && bench fp8-single-8b --shape 8b --quantization fp8 --num-prompts 1 --input-len 512 --output-len 512
want awq-single-8b && bench awq-single-8b --shape 8b --quantization awq --num-prompts 1 --input-len 512 --output-len 512
want awq-w1-8b && bench awq-w1-8b --shape 8b --quantization awq --num-prompts 256 --input-len 512 --output-len 256
want gptq-single-8b && bench gptq-single-8b --shape 8b --quantization gptq --num-prompts 1 --input-len 512 \
  --output-len 512
want long-8b && bench long-8b --shape 8b --num-prompts 64 --input-len 7680 --output-len 512 --max-model-len 8192
want long-8b-fp8kv && bench long-8b-fp8kv --shape 8b --kv-cache-dtype fp8 --num-prompts 64 --input-len 7680 \
  --output-len 512 --max-model-len 8192
want awq-single-70b && bench awq-single-70b --shape 70b --quantization awq --num-prompts 1 --input-len 512 \
  --output-len 512 --max-model-len 4096
want awq-w1-70b && bench awq-w1-70b --shape 70b --quantization awq --num-prompts 256 --input-len 512 \
  --output-len 256 --max-model-len 4096
serve_model=/tmp/paged-serve-1b
if want serve || want serve-hf; then
  [ -d $serve_model ] || python3 benchmarks/serving_model.py --tokenizer .bench/smollm2-tokenizer --out $serve_model \
    >>"$OUT/serve.log" 2>&1 || { tail -5 "$OUT/serve.log"; exit 1; }
fi
wait_ready() {  # url, pid: until it answers /health or its process is gone
  for _ in $(seq 600); do
    curl -sf "$1/health" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}
load() {  # name, url, then serve.py arguments; one JSON line per level into results.jsonl
  local name=$1 url=$2; shift 2
  echo "== $name: $*"
  python3 benchmarks/serve.py --base-url "$url" --result-json "$OUT/$name.json" "$@" >>"$OUT/serve.log" 2>&1
  python3 -c "import json; [print(json.dumps({**s, 'name': '$name'})) for s in json.load(open('$OUT/$name.json'))]" \
    | tee -a "$RESULTS"
}
paged_server() {  # api server count ("auto": the backend's choice), then the loads to run against it (a function)
  local count=$1 url=http://127.0.0.1:8100 flag=(); shift
  [ "$count" = auto ] || flag=(--api-server-count "$count")
  python3 -m paged.cli.main serve $serve_model --port 8100 --host 127.0.0.1 "${flag[@]}" \
    --max-model-len 4096 --uvicorn-log-level warning >"$OUT/paged-serve-$count.log" 2>&1 &
  local pid=$!
  if wait_ready $url $pid; then "$@" "$count" $url; else echo "paged serve did not start"; tail -5 "$OUT/paged-serve-$count.log"; fi
  kill -TERM $pid; wait $pid
}
paged_loads() {  # api server count, url
  load "paged-a$1-c32" "$2" --ignore-eos --num-prompts 512 --input-len 512 --output-len 256 --max-concurrency 32
  load "paged-a$1-c256" "$2" --ignore-eos --num-prompts 512 --input-len 512 --output-len 256 --max-concurrency 256
  load "paged-a$1-4x64" "$2" --ignore-eos --num-prompts 1024 --input-len 512 --output-len 256 --max-concurrency 256 \
    --num-clients 4
  load "paged-a$1-mixed-4x64" "$2" --ignore-eos --dataset mixed --num-prompts 1024 --input-len 256 --output-len 192 \
    --max-concurrency 256 --num-clients 4
}
chat_load() {  # name, url: the workload both servers take (chat, random words; transformers refuses ignore_eos,
  # and random weights rarely sample EOS, so output lengths stay near max_tokens for both)
  load "$1" "$2" --endpoint chat --model $serve_model --num-prompts 256 --input-len 512 --output-len 256 \
    --max-concurrency 256 --num-clients 4 --timeout 300
}
if want serve; then
  bench offline-serve-1b --model $serve_model --num-prompts 256 --input-len 512 --output-len 256
  for count in ${API_SERVERS:-auto 2 1}; do paged_server "$count" paged_loads; done
fi
if want serve-hf; then
  paged_chat() { chat_load "paged-a$1-chat-4x64" "$2"; }
  paged_server "${API_SERVERS%% *}" paged_chat
  mkdir -p ~/.cache/huggingface/hub  # its /v1/models scans the Hub cache, and fails where there is none
  transformers serve --help >"$OUT/transformers-serve.log" 2>&1
  model_arg=($serve_model)  # the model to preload: an argument, or --force-model in older releases
  grep -q -- --force-model "$OUT/transformers-serve.log" && model_arg=(--force-model $serve_model)
  transformers serve "${model_arg[@]}" --continuous-batching --port 8200 --host 127.0.0.1 --device cuda \
    --dtype bfloat16 >>"$OUT/transformers-serve.log" 2>&1 &
  hf_pid=$!
  if wait_ready http://127.0.0.1:8200 $hf_pid; then chat_load hf-serve-chat-4x64 http://127.0.0.1:8200
  else echo "transformers serve did not start"; tail -5 "$OUT/transformers-serve.log"; fi
  kill -TERM $hf_pid; wait $hf_pid
fi
profile() {  # file name, then throughput.py arguments
  local name=$1; shift
  python3 benchmarks/throughput.py "$@" --no-compare-hf --profile "$OUT/$name" >>"$OUT/bench.log" 2>&1
}
if want profile; then
  profile profile.txt --shape 1b --num-prompts 256 --input-len 512 --output-len 256
  profile profile-single.txt --shape 1b --num-prompts 1 --input-len 512 --output-len 512
fi
want profile-long && profile profile-long.txt --shape 1b --num-prompts 64 --input-len 7680 --output-len 512 \
  --max-model-len 8192
want profile-single-8b && profile profile-single-8b.txt --shape 8b --num-prompts 1 --input-len 512 --output-len 512
if want startup; then  # imports, then start-up twice (the first run fills the Triton cache where it was empty)
  python3 -X importtime -c "from paged import LLM; import paged.backends.cuda.backend" 2>"$OUT/importtime.txt"
  sort -t'|' -k2 -n "$OUT/importtime.txt" | tail -25
  for run in 1 2; do
    bench "startup-$run" --shape 1b --num-prompts 1 --input-len 16 --output-len 1
  done
  python3 -m cProfile -s cumulative benchmarks/throughput.py --shape 1b --num-prompts 1 --input-len 16 \
    --output-len 1 --no-compare-hf 2>>"$OUT/bench.log" | head -120 >"$OUT/startup-profile.txt"
fi
# Speculative decoding (issue 18): the GPU tests, then single streams and loaded batches against no speculation.
spec() { local name=$1; shift; peer "$name" benchmarks/spec_decode.py --workload random "$@"; }
if want spec-tests; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k speculative >"$OUT/spec-tests.log" 2>&1
  echo "spec gpu tests exit $?" | tee -a "$OUT/spec-tests.log"; tail -3 "$OUT/spec-tests.log"
fi
if want spec-single; then
  spec spec-1b-single --shape 1b --streams 1 --methods ngram,oracle,draft=1b-draft,self-draft --output-len 512
  spec spec-1b-single-miss3 --shape 1b --streams 1 --methods oracle --oracle-miss 3 --output-len 512
fi
# The same with logits sharpened (see spec_decode.py): greedy tokens that bf16 rounding does not change.
if want spec-sharp; then
  spec spec-1b-sharp --shape 1b --streams 1 --methods ngram,oracle,self-draft --output-len 512 --sharpen 30
  spec spec-1b-sharp-miss3 --shape 1b --streams 1 --methods oracle --oracle-miss 3 --output-len 512 --sharpen 30
  spec spec-1b-sharp-batches --shape 1b --streams 8,32 --methods ngram,oracle --output-len 256 --sharpen 30
  spec spec-8b-sharp --shape 8b --streams 1 --methods ngram,oracle --output-len 256 --sharpen 30
fi
want spec-batches && spec spec-1b-batches --shape 1b --streams 8,64 --methods ngram,oracle --output-len 256
want spec-8b && spec spec-8b-single --shape 8b --streams 1 --methods ngram,oracle --output-len 256
[ -f "$RESULTS" ] && python3 benchmarks/summarize_gpu.py "$RESULTS" | tee "$OUT/summary.md"
if want structured-1b; then
  echo "== structured-1b"
  python3 benchmarks/structured.py --shape 1b --tokenizer .bench/smollm2-tokenizer --num-prompts 64 \
    --output-len 256 --rounds 4 --kv-cache-memory 8GiB 2>>"$OUT/bench.log" | tail -1 | \
    python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['name']='structured-1b'; print(json.dumps(r))" | \
    tee -a "$RESULTS"
fi
