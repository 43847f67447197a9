"""The loss curve a run writes next to its checkpoints (raw and smoothed, the lr, eval metrics).
"""

from __future__ import annotations


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_loss_curve(history: dict, title: str = "training loss"):
    """Loss per step (raw and smoothed), the lr schedule, and eval metrics when there are any."""
    from matplotlib.figure import Figure

    train_log = history.get("train", [])
    evals = history.get("eval", [])
    metric_names = sorted({k for e in evals for k in e if k != "step"})
    fig = Figure(figsize=(9 if metric_names else 6, 3.6))
    axes = fig.subplots(1, 2 if metric_names else 1, squeeze=False)[0]
    ax = axes[0]
    steps = [r["step"] for r in train_log]
    losses = [r["loss"] for r in train_log]
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, label="loss")
    if losses:
        ax.plot(steps, smooth(losses), color="tab:blue", label="smoothed")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_title(title)
    if train_log:
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [max(r["lr"].values()) for r in train_log], color="tab:gray", linestyle=":",
                   label="max lr")
        lr_ax.set_ylabel("learning rate", color="tab:gray")
    ax.legend(loc="upper right")
    if metric_names:
        for name in metric_names:
            points = [(e["step"], e[name]) for e in evals if name in e]
            axes[1].plot(*zip(*points), marker="o", label=name)
        axes[1].set_xlabel("optimiser step")
        axes[1].set_title("evaluation")
        axes[1].legend()
    fig.tight_layout()
    return fig
