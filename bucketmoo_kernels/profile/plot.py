"""Heat maps of a :class:`~.report.ConflictReport` (matplotlib, imported only here, when called)."""

from __future__ import annotations

import os

__all__ = ["plot_report"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("ConflictReport.plot needs matplotlib: pip install matplotlib "
                          "(the report's numbers, to_markdown() and to_dict() work without it)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(report, by: str) -> tuple[list[str], list[list[float]], list[list[float]]]:
    """Row labels, per-row pair cosines and per-row weights (the whole model last)."""
    if by == "layer":
        table = report.layer_table()
        labels = [r["layer"] for r in table]
        cos = [r["cosine"] for r in table]
        weights = [r["weights"] for r in table]
    elif by == "segment":
        labels = [r.name for r in report.segments]
        cos = [[r.cosine[i][j] for i, j in report.pairs] for r in report.segments]
        weights = [list(r.weights) for r in report.segments]
    else:
        raise ValueError(f"by must be 'layer' or 'segment'; got {by!r}")
    g = report.global_segment
    return (labels + ["(whole model)"], cos + [[g.cosine[i][j] for i, j in report.pairs]],
            weights + [list(g.weights)])


def plot_report(report, path: str, *, by: str = "layer") -> str:
    """Write the cosine and weight heat maps of ``report`` to ``path`` (PNG); returns ``path``."""
    labels, cos, weights = _rows(report, by)
    plt = _pyplot()
    pairs, tasks = report.pair_names, report.tasks
    height = min(40.0, 1.6 + 0.28 * len(labels))
    fig, (ax_c, ax_w) = plt.subplots(
        1, 2, figsize=(3.0 + 0.55 * (len(pairs) + len(tasks)) + 0.06 * max(len(s) for s in labels), height),
        gridspec_kw={"width_ratios": [max(1, len(pairs)), max(1, len(tasks))]}, constrained_layout=True)
    annotate = len(labels) <= 60
    im_c = ax_c.imshow(cos, cmap="RdBu", vmin=-1.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax_c.set_xticks(range(len(pairs)), pairs, rotation=45, ha="right")
    ax_c.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) > 30 else 9)
    ax_c.set_title("mean cosine per task pair\n(blue: aligned, red: conflicting)", fontsize=9)
    fig.colorbar(im_c, ax=ax_c, shrink=0.6)
    top = max(1e-9, max(max(w) for w in weights))
    im_w = ax_w.imshow(weights, cmap="viridis", vmin=0.0, vmax=top,
                       aspect="auto", interpolation="nearest")
    ax_w.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax_w.set_yticks(range(len(labels)), [""] * len(labels))
    ax_w.set_title(f"{report.method} weights", fontsize=9)
    fig.colorbar(im_w, ax=ax_w, shrink=0.6)
    if annotate:
        size = 6 if len(labels) > 30 else 7
        for y, row in enumerate(cos):
            for x, v in enumerate(row):
                ax_c.text(x, y, f"{v:+.2f}", ha="center", va="center", fontsize=size,
                          color="white" if abs(v) > 0.6 else "black")
        for y, row in enumerate(weights):
            for x, v in enumerate(row):
                ax_w.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=size,
                          color="black" if v > 0.6 * top else "white")
    for ax in (ax_c, ax_w):
        ax.axhline(len(labels) - 1.5, color="black", linewidth=1.0)
    fig.suptitle(f"{', '.join(tasks)}: conflicts by {by} ({report.granularity}, {report.steps} steps)", fontsize=10)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
