"""Draw a Plan: one horizontal bar per GPU, cut into its gpu-lets (width = share),
each labelled with its models and batch sizes. For `controlplane plan --png FILE`.

    from controlplane.plot import plot
    plot(plan, "plan.png")
"""

from __future__ import annotations

from pathlib import Path

from .spec import Plan


def plot(plan: Plan, path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG of ``plan`` to ``path`` (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    gpus = sorted({g.gpu for g in plan.gpulets}) or [0]
    models = plan.model_names()
    cmap = plt.get_cmap("tab20")
    colour = {m: cmap(i % 20) for i, m in enumerate(models)}
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.55 * len(gpus)))
    for row, gpu in enumerate(gpus):
        x = 0
        for g in sorted((g for g in plan.gpulets if g.gpu == gpu), key=lambda g: g.id):
            # a time-shared gpu-let is split vertically, one stripe per model
            h = 0.8 / len(g.models)
            for k, a in enumerate(g.models):
                ax.barh(row - 0.4 + h * (k + 0.5), g.share, height=h, left=x, color=colour[a.model],
                        edgecolor="black", linewidth=0.6)
                ax.text(x + g.share / 2, row - 0.4 + h * (k + 0.5), f"{a.model} b{a.batch}",
                        ha="center", va="center", fontsize=7)
            ax.text(x + 1, row + 0.42, f"{g.id} {g.share}%", fontsize=6, va="bottom")
            x += g.share
        if x < 100:
            ax.barh(row, 100 - x, left=x, height=0.8, color="white", edgecolor="grey", hatch="//", linewidth=0.4)
    ax.set_yticks(range(len(gpus)), [f"GPU {g}" for g in gpus])
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of the GPU (%)")
    ax.invert_yaxis()
    ax.set_title(title or f"{plan.deployment}: {plan.gpus} GPU(s), {plan.algorithm}, {plan.device}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
