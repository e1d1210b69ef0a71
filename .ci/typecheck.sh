#!/usr/bin/env bash
# mypy on server/, scheduler/, adapter_cache/ and engine/, checked under their package names
# (loraplex.server, ...). The repository root IS the `loraplex` package (pyproject's package-dir maps
# "loraplex" = "."), so mypy runs from a scratch folder holding one symlink `loraplex` -> the repo:
# every module then has exactly one name (no "kernels" found twice, as a plain `mypy server` gives).
#
#   bash .ci/typecheck.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
ln -s "$repo" "$root/loraplex"
cd "$root"
python3 -m mypy --config-file "$repo/pyproject.toml" \
    -p loraplex.server -p loraplex.scheduler -p loraplex.adapter_cache -p loraplex.engine
