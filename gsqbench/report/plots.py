"""Report figures and image panels: matplotlib (Agg) PNGs and numpy/PIL crops, written atomically.

Plots mirror the paper's figures (gsq-reference.md §7.9): training curves, rate–distortion (bits/token vs quality),
per-group code usage with rank–frequency (Zipf) curves, and scaling grids (latent dim × vocabulary; compression ×
groups). Rate–distortion and scaling points are a subject's mean over seeds with error bars to its 95 % interval
(gsqbench.stats), never one line zig-zagging through every seed. Nothing here imports torch.
"""
from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from gsqbench.io import atomic_write_bytes

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
MAX_GROUPS_DRAWN = 16  # beyond this a per-group legend is unreadable; the usage bars still show every group


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit: reports render on headless CI machines
    import matplotlib.pyplot as plt

    return plt


def _text(label: Any) -> str:
    # '$' would switch matplotlib to mathtext and could fail on user-given names
    return str(label).replace("$", r"\$")


def save_figure(fig, path: Path) -> Path:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)  # tight_layout already ran; bbox "tight" would draw twice
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def training_curves(logs: Mapping[str, "pd.DataFrame"], path: Path) -> Path | None:
    """One panel per loss column (total first, then components) plus learning rate; one line per run."""
    columns: list[str] = []
    for df in logs.values():
        columns += [c for c in df.columns if (c == "loss" or c.startswith("loss_") or c == "lr") and c not in columns]
    columns = sorted(columns, key=lambda c: (c != "loss", c == "lr", c))[:8]
    if not columns:
        return None
    plt = _pyplot()
    ncols = min(4, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.6 * nrows), squeeze=False)
    for ax, col in zip(axes.flat, columns):
        for label, df in logs.items():
            if col in df.columns and "step" in df.columns:
                few = int(df[col].notna().sum()) < 20  # sparse series (e.g. GAN losses that start late) need markers
                ax.plot(df["step"], df[col], label=_text(label), linewidth=1.2, marker="." if few else None)
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if col == "loss" and len(logs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def _yerr(err: Any) -> Any:
    """matplotlib's asymmetric yerr for one point from (minus, plus), or None (no interval: no bar)."""
    return None if err is None else [[max(0.0, float(err[0]))], [max(0.0, float(err[1]))]]


def rate_distortion(points: Sequence[Mapping[str, Any]], metrics: Sequence[tuple[str, str]],
                    path: Path) -> tuple[Path | None, list[str]]:
    """bits/token (x) vs each quality metric (y), one marker per point (a subject's mean over seeds), with an error
    bar when the point carries `<key>:err` = (minus, plus). Metrics with no available value are skipped and named in
    the returned notes."""
    notes, drawable = [], []
    for key, title in metrics:
        pts = [(p["bits"], p[key], p["label"], p.get(f"{key}:err")) for p in points
               if _finite(p.get("bits")) and _finite(p.get(key))]
        (drawable.append((key, title, pts)) if pts else notes.append(f"{title}: unavailable for every run, not plotted"))
    if not drawable:
        return None, notes
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(drawable), figsize=(3.6 * len(drawable), 2.9), squeeze=False)
    for ax, (key, title, pts) in zip(axes.flat, drawable):
        for bits, val, label, err in pts:
            ax.errorbar([bits], [val], yerr=_yerr(err), fmt="o", markersize=5, capsize=3, label=_text(label))
        ax.set_xlabel("bits / token", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path), notes


def code_usage(counts_by_run: Mapping[str, np.ndarray], path: Path) -> Path:
    """Left: fraction of the V codes each group used, one bar per run and group. Right: rank–frequency of each
    group's codes (log–log, Zipf), one colour per run and one thin line per group. One figure per comparison group
    keeps the report small and fast to render."""
    plt = _pyplot()
    fig, (ax_u, ax_z) = plt.subplots(1, 2, figsize=(8.4, 3.0))
    n = len(counts_by_run)
    width = 0.8 / max(n, 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, counts) in enumerate(counts_by_run.items()):
        counts = np.asarray(counts, dtype=np.int64)  # (G, V)
        g, v = counts.shape
        color = colors[i % len(colors)]
        usage = (counts > 0).sum(axis=1) / v
        ax_u.bar(np.arange(g) + i * width, usage, width=width, color=color, label=f"{_text(label)} (V={v})")
        for gi in range(min(g, MAX_GROUPS_DRAWN)):
            freq = np.sort(counts[gi])[::-1]
            freq = freq[freq > 0]
            if freq.size:
                ax_z.plot(np.arange(1, freq.size + 1), freq / freq.sum(), linewidth=0.9, color=color,
                          alpha=1.0 if gi == 0 else 0.5, label=_text(label) if gi == 0 else None)
    max_g = max(np.asarray(c).shape[0] for c in counts_by_run.values()) if counts_by_run else 1
    ax_u.set_xticks(np.arange(max_g) + 0.4 - width / 2, [str(i) for i in range(max_g)])
    ax_u.set_ylim(0, 1.05)
    ax_u.set_xlabel("group", fontsize=8)
    ax_u.set_ylabel("codes used / V", fontsize=8)
    ax_u.set_title("usage per group", fontsize=9)
    ax_z.set_xscale("log")
    ax_z.set_yscale("log")
    ax_z.minorticks_off()  # minor log ticks cost most of the drawing time and add nothing here
    ax_z.set_xlabel("rank", fontsize=8)
    ax_z.set_ylabel("frequency", fontsize=8)
    ax_z.set_title("rank–frequency (Zipf), one line per group", fontsize=9)
    for ax in (ax_u, ax_z):
        ax.tick_params(labelsize=7)
    # one legend under both panels (same colour per run in both), so it never hides a bar or a curve
    handles, labels = ax_u.get_legend_handles_labels()
    rows = math.ceil(len(labels) / 4)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, min(0.4, 0.09 * rows + 0.02), 1, 1))
    return save_figure(fig, path)


def scaling(points: Sequence[Mapping[str, Any]], x_key: str, series_key: str | None, metric_title: str,
            path: Path, *, log_x: bool = False) -> Path:
    """Metric (y) against one grid axis (x), one line per value of the other axis, like the paper's grids. Each point
    is one grid point (the mean over its seeds); `err` = (minus, plus) draws its error bar, None draws none."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    series: dict[Any, list[tuple[float, float, Any]]] = {}
    for p in points:
        series.setdefault(p.get(series_key) if series_key else None, []).append((p[x_key], p["y"], p.get("err")))
    for name, pts in sorted(series.items(), key=lambda kv: str(kv[0])):
        pts.sort(key=lambda t: t[0])
        minus = [0.0 if e is None else max(0.0, float(e[0])) for _, _, e in pts]
        plus = [0.0 if e is None else max(0.0, float(e[1])) for _, _, e in pts]
        has_err = any(e is not None for _, _, e in pts)
        ax.errorbar([a for a, _, _ in pts], [b for _, b, _ in pts], yerr=[minus, plus] if has_err else None,
                    marker="o", linewidth=1.2, capsize=3, label=f"{series_key}={_num(name)}" if series_key else None)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x_key, fontsize=8)
    ax.set_ylabel(metric_title, fontsize=8)
    ax.tick_params(labelsize=7)
    if series_key:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else _text(x)


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------- image panels
def load_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def save_png(arr: np.ndarray, path: Path) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def center_zoom(arr: np.ndarray, factor: int = 2) -> np.ndarray:
    """The centre quarter (half height × half width), upscaled by nearest neighbour so pixels stay visible."""
    h, w = arr.shape[:2]
    top, left = h // 4, w // 4
    crop = arr[top:top + max(1, h // 2), left:left + max(1, w // 2)]
    return crop.repeat(factor, axis=0).repeat(factor, axis=1)


def error_heatmap(real: np.ndarray, recon: np.ndarray, vmax: float = 64.0) -> np.ndarray:
    """|real − recon| averaged over channels, through a perceptual colormap; a fixed scale (0..vmax of 255) so
    heatmaps of different subjects compare by eye."""
    import matplotlib

    if real.shape != recon.shape:
        raise ValueError(f"sample shapes differ: real {real.shape} vs recon {recon.shape}")
    err = np.abs(real.astype(np.float32) - recon.astype(np.float32)).mean(axis=2)  # (H, W)
    rgba = matplotlib.colormaps["magma"](np.clip(err / vmax, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)
