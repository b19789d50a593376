"""Learning curves: the validations each training folder logged, against the run's total iteration.

``training.engine.train_loop`` appends one JSON record per validation to ``<folder>/validations.jsonl``
(``phase``, ``iteration`` within the phase, ``total_iteration`` = iterations of the earlier phases +
``iteration``, ``dice`` = the selection score, ``dice_class<c>``). A run's curve is every record
under its folder (pre-training and each stage, or the supervised run), ordered by total iteration.
"""
import json
from pathlib import Path

from training.engine import VAL_HISTORY


def read_history(run_dir):
    """The validation records of one run (every ``validations.jsonl`` below ``run_dir``), sorted by
    ``total_iteration``; a record repeated by a resume (same phase and iteration) counts once, the
    later line winning."""
    records = {}
    for path in sorted(Path(run_dir).rglob(VAL_HISTORY)):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (rec["phase"], int(rec["iteration"]))
                float(rec["dice"]), int(rec["total_iteration"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not a validation record ({err})") from None
            records[key] = rec
    return sorted(records.values(), key=lambda r: (int(r["total_iteration"]), r["phase"] != "pretrain"))


def stage_boundaries(config):
    """Total iterations at which a new curriculum stage begins (after pre-training and each stage
    but the last), from a run's config.yaml; [] for the labeled-only baseline."""
    if not config or config.get("method") == "labeled_only" or "stage_iterations" not in config:
        return []
    stages = config["stage_iterations"]
    stages = list(stages) if isinstance(stages, (list, tuple)) else [stages]
    edges, total = [], int(config.get("pre_iterations") or 0)
    for n in stages:
        edges.append(total)
        total += int(n)
    return [e for e in edges if e > 0]


def _label_panel(ax, labelnum, legend_columns):
    ax.set_title(f"{labelnum} labeled")
    ax.set_xlabel("total iteration (dotted: stage boundaries)")
    ax.set_ylabel("val Dice (selection score)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8 if legend_columns == 1 else 7, ncol=legend_columns)


def _save(fig, plt, title, out_path):
    fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def mean_curves(runs):
    """Per ``(method, labelnum)``: ``(x, mean, std, n)`` over the seeds, at every validation that each
    of them logged (matched by phase and iteration, so a stage start and the validation before it at
    the same total iteration stay two points), in the order of the first run's history; std is the
    sample std (0 for one seed). ``runs`` as for ``plot_learning_curves``."""
    import numpy as np
    groups = {}
    for r in runs:
        if r["history"]:
            groups.setdefault((r["method"], r["labelnum"]), []).append(r["history"])
    out = {}
    for key, histories in groups.items():
        tables = [{(h["phase"], int(h["iteration"])): h for h in hist} for hist in histories]
        points = [k for k in tables[0] if all(k in t for t in tables[1:])]
        values = np.array([[float(t[k]["dice"]) for k in points] for t in tables])
        x = [int(tables[0][k]["total_iteration"]) for k in points]
        std = values.std(axis=0, ddof=1) if len(tables) > 1 else np.zeros(len(points))
        out[key] = (x, values.mean(axis=0), std, len(tables))
    return out


def plot_mean_curves(runs, out_path, title="val Dice during training, mean ± std over seeds", order=()):
    """Write a PNG with one panel per labeled count and one line per method: the mean over seeds
    (``mean_curves``) with a ±std band, stage boundaries dotted. Returns the path, or None when no
    run has a validation."""
    curves = mean_curves(runs)
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(order)
    methods = sorted({m for m, _ in curves}, key=lambda m: (order.index(m) if m in order else len(order), m))
    labelnums = sorted({n for _, n in curves})
    configs = {r["method"]: r["config"] for r in runs}
    fig, axes = plt.subplots(1, len(labelnums), figsize=(6.5 * len(labelnums), 4.2), squeeze=False)
    for ax, labelnum in zip(axes[0], labelnums):
        for k, method in enumerate(methods):
            if (method, labelnum) not in curves:
                continue
            x, mean, std, n = curves[(method, labelnum)]
            colour = f"C{k}"
            ax.plot(x, mean, color=colour, lw=1.5, label=f"{method} (n={n})")
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15, lw=0)
            for edge in stage_boundaries(configs.get(method)):
                ax.axvline(edge, color=colour, ls=":", lw=0.8, alpha=0.6)
        _label_panel(ax, labelnum, legend_columns=1)
    return _save(fig, plt, title, out_path)


def plot_learning_curves(runs, out_path, title="val Dice during training", order=()):
    """Write a PNG with one panel per labeled count and one line per run (colour = method, line
    style = seed), the stage boundaries of each method as dotted lines in its colour.

    ``runs``: dicts with ``method``, ``labelnum``, ``seed``, ``history`` (``read_history``) and
    ``config``; ``order``: the methods' order in the legend. Returns the path, or None when no run
    has a validation."""
    runs = [r for r in runs if r["history"]]
    if not runs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labelnums = sorted({r["labelnum"] for r in runs})
    order = list(order)
    methods = sorted({r["method"] for r in runs}, key=lambda m: (order.index(m) if m in order else len(order), m))
    seeds = sorted({r["seed"] for r in runs})
    colours = {m: f"C{k}" for k, m in enumerate(methods)}
    styles = {s: ("-", "--", ":", "-.")[k % 4] for k, s in enumerate(seeds)}
    fig, axes = plt.subplots(1, len(labelnums), figsize=(6.5 * len(labelnums), 4.2), squeeze=False)
    for ax, labelnum in zip(axes[0], labelnums):
        drawn = set()
        for r in sorted((r for r in runs if r["labelnum"] == labelnum), key=lambda r: (methods.index(r["method"]),
                                                                                       r["seed"])):
            x = [int(h["total_iteration"]) for h in r["history"]]
            y = [float(h["dice"]) for h in r["history"]]
            ax.plot(x, y, styles[r["seed"]], color=colours[r["method"]], lw=1.3, marker=".", ms=3,
                    label=f"{r['method']} s{r['seed']}")
            if r["method"] not in drawn:
                for edge in stage_boundaries(r["config"]):
                    ax.axvline(edge, color=colours[r["method"]], ls=":", lw=0.8, alpha=0.6)
                drawn.add(r["method"])
        _label_panel(ax, labelnum, legend_columns=2)
    return _save(fig, plt, title, out_path)

