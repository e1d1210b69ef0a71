"""Load-test reports of run summaries (see `stats.summarize`): a Markdown table and the PNG plot of a
sweep (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


TABLE_HEADER = (
    "| server | adapters | load | ok | errors | req/s | out tok/s | TTFT p50 / p90 / p99 (ms) "
    "| TPOT p50 / p90 / p99 (ms) | ITL p50 / p99 (ms) | E2E p50 / p99 (s) |"
)


def table_row(server: str, adapters: int | str, load: str, s: dict) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "0"
    t, p, i, e = s["ttft"], s["tpot"], s["itl"], s["e2e"]
    e2e = "-" if e["p50"] is None else f"{e['p50']:.2f} / {e['p99']:.2f}"
    return (
        f"| {server} | {adapters} | {load} | {s['num_ok']} | {errors} | {s['request_throughput']:.2f} "
        f"| {s['output_throughput']:.1f} | {_ms(t['p50'])} / {_ms(t['p90'])} / {_ms(t['p99'])} "
        f"| {_ms(p['p50'])} / {_ms(p['p90'])} / {_ms(p['p99'])} | {_ms(i['p50'])} / {_ms(i['p99'])} | {e2e} |"
    )


def table(rows: list[dict]) -> str:
    """A Markdown table of rows {"server", "adapters", "load", "summary"}."""
    aligns = ["---" if n in (0, 2) else "---:" for n in range(TABLE_HEADER.count("|") - 1)]  # text left
    sep = "|" + "|".join(aligns) + "|"
    lines = [TABLE_HEADER, sep]
    lines += [table_row(r["server"], r["adapters"], r["load"], r["summary"]) for r in rows]
    return "\n".join(lines)


def plot_sweep(
    rows: list[dict], path: Path, x_key: str, series_key: str, title: str, x_label: str | None = None
) -> Path | None:
    """Throughput and latency against `x_key` (one line per value of `series_key`) into a PNG.

    rows: dicts holding x_key, series_key and "summary". Returns None (after a note on stdout) when
    matplotlib is not installed (`pip install loraplex[bench]`).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return None
    panels = [
        ("output tok/s", lambda s: s["output_throughput"], None),
        ("TTFT (s)", lambda s: s["ttft"]["p50"], lambda s: s["ttft"]["p99"]),
        ("TPOT (s)", lambda s: s["tpot"]["p50"], lambda s: s["tpot"]["p99"]),
        ("E2E latency (s)", lambda s: s["e2e"]["p50"], lambda s: s["e2e"]["p99"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    series = list(dict.fromkeys(r[series_key] for r in rows))
    for ax, (name, mid, tail) in zip(axes, panels, strict=True):
        for k, value in enumerate(series):
            points = sorted(
                ((r[x_key], r["summary"]) for r in rows if r[series_key] == value), key=lambda p: p[0]
            )
            xs = [x for x, _ in points]
            color = f"C{k}"
            label = value if isinstance(value, str) else f"{series_key}={value}"
            ax.plot(
                xs, [mid(s) for _, s in points], "o-", color=color, label=label + (" p50" if tail else "")
            )
            if tail is not None:
                ax.plot(xs, [tail(s) for _, s in points], "x--", color=color, label=label + " p99")
        ax.set_xlabel(x_label or x_key)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
