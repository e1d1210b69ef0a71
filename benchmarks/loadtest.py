"""Load generator for any OpenAI-compatible endpoint (the same as `loraplex bench`; see its --help).

    python benchmarks/loadtest.py --url http://127.0.0.1:8000 --rate 1,2,4 --num-adapters 8 \\
        --popularity zipf --duration 60 --out benchmarks/out/loadtest.json
"""

from __future__ import annotations

from loraplex.bench_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
