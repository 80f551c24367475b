"""The Stage I importance chart, drawn once for the training run's importance.png and the ComfyUI node.

matplotlib is imported inside the function: the library stays importable without it.
"""
from __future__ import annotations

from .importance import ImportanceResult
from .plan import PrunePlan


def importance_figure(result: ImportanceResult, plan: PrunePlan):
    """A matplotlib Figure: each block's score, kept and dropped blocks in two colours, the full model dashed."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(result.scores)
    fig = Figure(figsize=(max(8.0, 0.25 * n), 3.6), dpi=100)
    ax = fig.add_subplot()
    kept = set(plan.kept)
    ax.bar(range(n), result.scores, color=["tab:blue" if i in kept else "tab:red" for i in range(n)])
    full = ax.axhline(result.reference_error, color="gray", linestyle="--", label="full model")
    ax.set_xlabel("block")
    ax.set_ylabel("x0 error with the block skipped")
    ax.set_title(f"Stage I block importance ({result.num_samples} draws)")
    ax.set_xticks(range(n))
    ax.legend(handles=[full, Patch(color="tab:blue", label=f"kept ({len(plan.kept)})"),
                       Patch(color="tab:red", label=f"dropped ({len(plan.dropped)})")],
              loc="best", fontsize="small")
    fig.tight_layout()
    return fig
