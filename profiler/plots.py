"""PNG plots of a latency table: latency against batch per share, throughput per share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from controlplane.profiles import ProfileRow


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def plot_tables(rows: Sequence[ProfileRow], out_dir: str | Path, dpi: int = 70) -> list[Path]:
    """latency_<precision>.png and throughput_<precision>.png under out_dir; small (< 200 KB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for precision in sorted({r.precision for r in rows}):
        rs = [r for r in rows if r.precision == precision]
        models = list(dict.fromkeys(r.model for r in rs))
        shares = sorted({r.share for r in rs})
        cmap = plt.get_cmap("viridis")
        colour = {s: cmap(i / max(1, len(shares) - 1)) for i, s in enumerate(shares)}
        device = rs[0].device
        for kind in ("latency", "throughput"):
            nr, nc = _grid(len(models))
            fig, axes = plt.subplots(nr, nc, figsize=(3.6 * nc, 2.6 * nr), squeeze=False)
            for ax, m in zip(axes.flat, models):
                for s in shares:
                    pts = sorted((r.batch, r.p50_ms) for r in rs if r.model == m and r.share == s)
                    if not pts:
                        continue
                    b = [p[0] for p in pts]
                    y = [p[1] for p in pts] if kind == "latency" else [1000.0 * p[0] / p[1] for p in pts]
                    ax.plot(b, y, marker="o", ms=3, lw=1.2, color=colour[s], label=f"{s}%")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(m, fontsize=9)
                ax.tick_params(labelsize=7)
                ax.set_xlabel("batch", fontsize=7)
                ax.set_ylabel("p50 ms" if kind == "latency" else "req/s (p50)", fontsize=7)
            for ax in list(axes.flat)[len(models):]:
                ax.axis("off")
            axes.flat[0].legend(fontsize=6, title="share", title_fontsize=6)
            fig.suptitle(f"{kind} per share — {device}, {precision}", fontsize=10)
            fig.tight_layout()
            path = out_dir / f"{kind}_{precision}.png"
            fig.savefig(path, dpi=dpi)
            plt.close(fig)
            written.append(path)
    return written
