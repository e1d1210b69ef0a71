#!/usr/bin/env bash
# loraplex serving MODEL_DIR with every adapter folder of ADAPTER_DIR (named after the folder), on
# 127.0.0.1:PORT: the same interface as vllm_server.sh.
#
#   benchmarks/baselines/loraplex_server.sh MODEL_DIR ADAPTER_DIR PORT [SLOTS [HOST_ADAPTERS [MAX_LORA_RANK]]] [EXTRA SERVE ARGS...]
#
# SLOTS: --max-active-adapters (device slots, default 8); HOST_ADAPTERS: --max-host-adapters (default 64).
# Environment: PYTHON (default python3), LORAPLEX_DTYPE (default here: bfloat16).
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,6p' "$0"
    exit 2
fi
model=$1 adapter_dir=$2 port=$3
slots=${4:-8} host_adapters=${5:-64} max_rank=${6:-16}
shift $(( $# < 6 ? $# : 6 ))
exec "${PYTHON:-python3}" -m loraplex.cli serve \
    --model "$model" --served-model-name "$(basename "$model")" --adapter-dir "$adapter_dir" \
    --host 127.0.0.1 --port "$port" --dtype "${LORAPLEX_DTYPE:-bfloat16}" \
    --max-active-adapters "$slots" --max-host-adapters "$host_adapters" --max-lora-rank "$max_rank" "$@"
