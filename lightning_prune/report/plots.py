"""The report's figures (matplotlib, Agg canvas, no pyplot state), returned as PNG bytes."""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from lightning_prune.report.masks import NMSummary, StructuredSummary
from lightning_prune.report.runs import RunData

Series = dict[str, list[tuple[int, float]]]

#: training-curve panels: title and which ``metrics.csv`` columns go in it
PANELS: list[tuple[str, Callable[[str], bool], bool]] = [
    ("LM loss (train, val) and distillation", lambda c: c in LOSSES, True),
    ("Regularizer penalty", lambda c: _is_penalty(c) and "Lagrangian" not in c, True),
    (
        "Lagrangian terms",
        lambda c: c.startswith("reg/lagrangian_") or c == "reg/UniformLagrangian",
        False,
    ),
    (
        "λ and Lagrange multipliers (mean)",
        lambda c: c.endswith(("_lambda", "_y1_mean", "_y2_mean")),
        False,
    ),
    ("Share of groups already N:M (all layers)", lambda c: c == "reg/nm_groups_done", False),
    (
        "Expected kept share (mean over layers) vs target",
        lambda c: (
            bool(re.fullmatch(r"reg/\w+_(expected_mean|target)", c))
            and not c.endswith("final_target")
        ),
        False,
    ),
    ("Learning rate", lambda c: c == "lr", True),
]
LOSSES: tuple[str, ...] = ("train/loss", "val/loss", "train/distill")
STYLES = ("-", "--", ":", "-.")
KEPT_COLORS = ListedColormap(["#dddddd", "#2e7d32"])
MAX_COLUMNS = 96  # unit maps wider than this are drawn as kept shares of unit blocks


def to_png(figure: Figure) -> bytes:
    """Render ``figure`` with the Agg canvas."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _label(column: str) -> str:
    return column.removeprefix("reg/")


def _is_penalty(column: str) -> bool:
    """Penalty columns are named after the regularizer class (``reg/NMSparsityRegularizer``)."""
    return bool(re.fullmatch(r"reg/[A-Z]\w*", column)) and not column.endswith("_lambda")


def training_curves(runs: list[RunData]) -> bytes | None:
    """Loss, regularizer terms, λ/multipliers, N:M share or kept share over steps; runs overlaid."""
    panels = []
    for title, wanted, log_ok in PANELS:
        lines = [
            (run, column)
            for run in runs
            for column in sorted(run.metrics)
            if wanted(column) and run.metrics[column]
        ]
        if lines:
            panels.append((title, lines, log_ok))
    if not panels:
        return None
    columns = 2 if len(panels) > 1 else 1
    rows = (len(panels) + columns - 1) // columns
    figure = Figure(figsize=(6.4 * columns, 3.9 * rows), layout="constrained")
    colors = {run.name: f"C{i % 10}" for i, run in enumerate(runs)}
    for index, (title, lines, log_ok) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        styles: dict[str, str] = {}
        for run, column in lines:
            steps, values = zip(*run.metrics[column])
            style = styles.setdefault(column, STYLES[len(styles) % len(STYLES)])
            label = _label(column) if len(runs) == 1 else f"{run.name}: {_label(column)}"
            marker = "o" if len(steps) < 3 or column == "val/loss" else None
            axes.plot(steps, values, style, color=colors[run.name], marker=marker, label=label)
        if log_ok:
            _scale(axes, [v for run, c in lines for _, v in run.metrics[c]])
        axes.set_title(title, fontsize=11)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="best")
    return to_png(figure)


def _scale(axes, values: list[float]) -> None:
    positive = [v for v in values if v > 0]
    if len(positive) == len(values) and positive and max(positive) / min(positive) > 100:
        axes.set_yscale("log")


def nm_figure(summary: NMSummary, metrics: Series, run_name: str) -> bytes:
    """N:M groups at the end (share already N:M per layer and module; groups by nonzeros per
    module) and, from the training log, the same two views over steps."""
    layers, modules = summary.layers, summary.modules
    height = max(4.2, 0.26 * len(layers) + 1.6)
    logged = any(c.startswith("reg/nm_groups_") for c in metrics)
    figure = Figure(figsize=(15, height * (1 + logged)), layout="constrained")
    figure.suptitle(f"{run_name}: {summary.n}:{summary.m} groups ({summary.what})", fontsize=12)
    grid = figure.add_gridspec(1 + logged, 2, width_ratios=[1.0, 1.1])
    colors = _level_colors(summary.n, summary.m)

    axes = figure.add_subplot(grid[0, 0])
    done = summary.done()
    low, high = _color_range(done)
    image = axes.imshow(done, aspect="auto", cmap="viridis", vmin=low, vmax=high)
    _layer_ticks(axes, layers)
    axes.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    axes.set_title(f"share of groups with ≤{summary.n} of {summary.m} nonzero, at the end")
    if done.size <= 160:
        for (i, j), value in np.ndenumerate(done):
            if np.isfinite(value):
                color = "black" if value > (low + high) / 2 else "white"
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    figure.colorbar(image, ax=axes, shrink=0.8)

    axes = figure.add_subplot(grid[0, 1])
    levels = np.nanmean(summary.levels, axis=0)  # [module, k]
    left = np.zeros(len(modules))
    for k in range(summary.m + 1):
        axes.barh(modules, levels[:, k], left=left, color=colors[k], label=f"{k} of {summary.m}")
        left += levels[:, k]
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("share of groups (mean over layers)")
    axes.set_title("groups by nonzero weights, at the end")
    axes.legend(
        title=f"nonzero weights per group (≤{summary.n}: already N:M)",
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
        ncol=summary.m + 1,
    )

    if logged:
        _nm_progress(figure, figure.add_subplot(grid[1, 0]), metrics)
        _nm_levels_progress(figure.add_subplot(grid[1, 1]), metrics, colors)
    return to_png(figure)


def _nm_levels_progress(axes, metrics: Series, colors: list) -> None:
    """Share of all groups by number of nonzeros over steps (stacked)."""
    columns = sorted(
        (int(m.group(1)), c) for c in metrics if (m := re.fullmatch(r"reg/nm_groups_nnz(\d+)", c))
    )
    if not columns:
        axes.set_axis_off()
        axes.text(0.5, 0.5, "groups by nonzeros were not logged by this run", ha="center")
        return
    steps = [step for step, _ in metrics[columns[0][1]]]
    shares = [[value for _, value in metrics[column]] for _, column in columns]
    axes.stackplot(steps, shares, colors=[colors[k] for k, _ in columns])
    axes.set_xlim(steps[0], steps[-1])
    axes.set_ylim(0, 1)
    axes.set_xlabel("step")
    axes.set_ylabel("share of groups (all layers)")
    axes.set_title("groups by nonzero weights while learning (colours as above)")


def _nm_progress(figure: Figure, axes, metrics: Series) -> None:
    """Share of groups already N:M over steps: per layer (heatmap) or overall (line)."""
    per_layer = _per_layer(metrics, r"reg/nm_groups_done_l(\d+)")
    if per_layer is not None:
        steps, values, indices = per_layer
        image = axes.imshow(
            values,
            aspect="auto",
            cmap="viridis",
            vmin=0,
            interpolation="nearest",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, len(indices) - 0.5, -0.5),
        )
        _layer_ticks(axes, indices)
        axes.set_xlabel("step")
        axes.set_title("share of groups already N:M while learning")
        figure.colorbar(image, ax=axes, shrink=0.8)
    else:
        done_steps, done = zip(*metrics["reg/nm_groups_done"])
        axes.plot(done_steps, done, marker="o" if len(done_steps) < 3 else None)
        axes.set_xlabel("step")
        axes.set_title("share of groups already N:M while learning (all layers)")
        axes.grid(alpha=0.3)


def structured_figure(summary: StructuredSummary, metrics: Series, run_name: str) -> bytes:
    """Kept heads and channels per layer (uniform width) and expected kept share over steps."""
    kinds = [k for k, kept in summary.kept.items() if kept.size]
    layers = max(kept.shape[0] for kept in summary.kept.values())
    height = max(4.0, 0.22 * layers + 2.0)
    logged = [k for k in kinds if _per_layer(metrics, rf"reg/{k}_expected_l(\d+)") is not None]
    figure = Figure(figsize=(6 * len(kinds) + 5 * bool(logged), height), layout="constrained")
    figure.suptitle(f"{run_name}: kept attention heads and MLP channels ({summary.what})")
    ratios = [1.0] * len(kinds) + [1.3] * bool(logged)
    grid = figure.add_gridspec(1, len(ratios), width_ratios=ratios)
    for index, kind in enumerate(kinds):
        kept = summary.kept[kind]
        axes = figure.add_subplot(grid[index])
        block = -(-kept.shape[1] // MAX_COLUMNS)  # units per drawn column
        if block == 1:
            axes.imshow(kept, aspect="auto", cmap=KEPT_COLORS, vmin=0, vmax=1)
            axes.set_xlabel(f"{kind[:-1]} index")
        else:  # too many units for one pixel each: kept share per block of units
            shares = _block_means(kept, block)
            extent = (-0.5, kept.shape[1] - 0.5, kept.shape[0] - 0.5, -0.5)
            image = axes.imshow(shares, aspect="auto", cmap="Greens", vmin=0, vmax=1, extent=extent)
            figure.colorbar(image, ax=axes, shrink=0.8, label=f"kept share per {block} {kind}")
            axes.set_xlabel(f"{kind[:-1]} index")
        _layer_ticks(axes, list(range(kept.shape[0])))
        counts = sorted(set(kept.sum(1).tolist()))
        width = (
            f"{counts[0]} of {kept.shape[1]} in every layer"
            if len(counts) == 1
            else (f"{counts[0]}–{counts[-1]} of {kept.shape[1]} (not uniform)")
        )
        legend = "green: kept, grey: removed" if block == 1 else "darker: more kept"
        axes.set_title(f"{kind} kept ({legend}):\n{width}", fontsize=10)
    if not logged:
        return to_png(figure)
    axes = figure.add_subplot(grid[len(kinds)])
    for color, kind in enumerate(kinds):
        per_layer = _per_layer(metrics, rf"reg/{kind}_expected_l(\d+)") if kind in logged else None
        if per_layer is None:
            continue
        steps, values, _ = per_layer
        for row, series in enumerate(values):
            label = f"{kind} (one line per layer)" if row == 0 else None
            axes.plot(steps, series, color=f"C{color}", alpha=0.5, lw=1, label=label)
        if metrics.get(f"reg/{kind}_target"):
            target_steps, target = zip(*metrics[f"reg/{kind}_target"])
            axes.plot(target_steps, target, "--", color=f"C{color}", lw=2, label=f"{kind} target")
    axes.set_xlabel("step")
    axes.set_ylabel("expected kept share")
    axes.set_title("expected kept share per layer while learning")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return to_png(figure)


def _block_means(kept: np.ndarray, block: int) -> np.ndarray:
    """Kept share of every ``block`` consecutive units (the last block may be shorter)."""
    starts = np.arange(0, kept.shape[1], block)
    return np.add.reduceat(kept.astype(float), starts, axis=1) / np.diff(
        np.append(starts, kept.shape[1])
    )


def _color_range(values: np.ndarray) -> tuple[float, float]:
    """The finite range of ``values`` for a share map; ``(0, 1)`` when it is under 0.05 wide."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or float(finite.max() - finite.min()) < 0.05:
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())


def _per_layer(metrics: Series, pattern: str) -> tuple[list[int], np.ndarray, list[int]] | None:
    """Per-layer series matching ``pattern`` (one group: the layer) as ``[layer, step]``."""
    columns = {int(m.group(1)): c for c in metrics if (m := re.fullmatch(pattern, c))}
    if not columns:
        return None
    indices = sorted(columns)
    steps = sorted({step for c in columns.values() for step, _ in metrics[c]})
    values = np.full((len(indices), len(steps)), np.nan)
    for row, layer in enumerate(indices):
        for step, value in metrics[columns[layer]]:
            values[row, steps.index(step)] = value
    return steps, values, indices


def _layer_ticks(axes, layers: list[int]) -> None:
    every = max(1, len(layers) // 16)
    positions = list(range(0, len(layers), every))
    axes.set_yticks(positions, [f"layer {layers[p]}" for p in positions], fontsize=8)


def _level_colors(n: int, m: int) -> list:
    """Greens for groups already N:M (``k ≤ n``), reds for groups still too dense."""
    from matplotlib import colormaps

    greens, reds = colormaps["Greens"], colormaps["Reds"]
    return [greens(0.35 + 0.55 * k / max(n, 1)) for k in range(n + 1)] + [
        reds(0.35 + 0.55 * (k - n) / max(m - n, 1)) for k in range(n + 1, m + 1)
    ]
