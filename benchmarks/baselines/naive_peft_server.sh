#!/usr/bin/env bash
# The naive transformers + PEFT server (naive_peft_server.py) with the interface of vllm_server.sh:
#
#   benchmarks/baselines/naive_peft_server.sh MODEL_DIR ADAPTER_DIR PORT [IGNORED SLOTS [IGNORED HOST [IGNORED RANK]]] [EXTRA ARGS...]
#
# It has no slots: every adapter is loaded into the one PeftModel at start. Environment: PYTHON
# (default python3), NAIVE_DTYPE (default bfloat16).
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,4p' "$0"
    exit 2
fi
model=$1 adapter_dir=$2 port=$3
shift $(( $# < 6 ? $# : 6 ))
exec "${PYTHON:-python3}" "$(dirname "$0")/naive_peft_server.py" \
    --model "$model" --adapter-dir "$adapter_dir" --port "$port" --dtype "${NAIVE_DTYPE:-bfloat16}" "$@"
