"""output_dir/plots/training.png from output_dir/metrics.jsonl: losses, learning rate, best metric."""
import json
import os

from utils.errors import UserError
from utils.files import atomic_write

PLOT = os.path.join("plots", "training.png")


def read_records(output_dir: str) -> list[dict]:
    """The records of metrics.jsonl; a line still being written (a run is going) is left out."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"no metrics.jsonl in {output_dir}; pass --output_dir= the output_dir of a run")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def check_plottable(output_dir: str, metric: str | None = None) -> None:
    """What a plot of the run would show, or one UserError: no line of metrics.jsonl with a step
    and a number, or a --metric the run never evaluated (naming those it did)."""
    records = read_records(output_dir)
    path = os.path.join(output_dir, "metrics.jsonl")
    usable = [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)
              and any(isinstance(v, (int, float)) and k != "step" for k, v in r.items())]
    if not usable:
        raise UserError(f"{path} has no usable line (each should be a JSON object with a step and metrics); "
                        "pass --output_dir= the output_dir of a run that has logged a step")
    evaluated = sorted({k[5:] for r in usable for k in r if k.startswith("eval/")})
    if metric and f"eval/{metric}" not in {k for r in usable for k in r}:
        have = ", ".join(evaluated) or "none (the run never evaluated)"
        raise UserError(f"{path} has no eval/{metric}; --metric can be one of: {have}")


def best_metric_of(records: list[dict]) -> str | None:
    for r in reversed(records):
        if "best_metric" in r:
            return r["best_metric"]
    return None


def plot_training(output_dir: str, metric: str | None = None) -> str:
    """Draw the run's curves to output_dir/plots/training.png (written whole: a reader never
    sees half a file); returns its path. `metric`: the eval metric of the third panel
    (default: the run's best_metric)."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed, also on a server
    import matplotlib.pyplot as plt

    records = read_records(output_dir)
    metric = metric or best_metric_of(records) or "bleu4"

    def series(key):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for key, label in (("train/loss", "train loss"), ("eval/loss", "validation loss")):
        x, y = series(key)
        if x:
            axes[0].plot(x, y, marker="o" if key.startswith("eval") else None, markersize=3, label=label)
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper right")
    x, y = series("train/lr")
    axes[1].plot(x, y, color="tab:green")
    axes[1].set_ylabel("learning rate")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    x, y = series(f"eval/{metric}")
    axes[2].plot(x, y, marker="o", markersize=3, color="tab:red")
    if y:
        lower = metric.split("/")[0] in ("loss", "perplexity", "kl")
        best = (min if lower else max)(range(len(y)), key=y.__getitem__)
        right = x[best] > (x[0] + x[-1]) / 2
        axes[2].annotate(f"best {y[best]:.4g} at step {x[best]}", (x[best], y[best]), textcoords="offset points",
                         xytext=(-6 if right else 6, -12), ha="right" if right else "left", fontsize=8)
    axes[2].set_ylabel(f"validation {metric}")
    axes[2].set_xlabel("optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(output_dir)))
    fig.tight_layout()
    path = os.path.join(output_dir, PLOT)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
