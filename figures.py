"""Pictures: Fig. 1 / Fig. 8 overlays of a mask on its scan, and Fig. 6, Fig. 7 and Table III from
the ablation's CSVs.

    python figures.py [--results results]     # Fig. 6, Fig. 7, Table III bars -> results/*.png (matplotlib)
    python infer.py RUN IMAGE OUT --png DIR   # the overlays, through overlay_figure and write_png below

Two kinds of picture, two ways of drawing. The overlays (infer.py --png) are drawn pixel by pixel in
numpy and written by a small PNG encoder of the standard library, so inference needs nothing beyond
the core packages. The plots of the ablation use matplotlib, imported inside `main` only: nothing
else in this project needs it. Everything here takes arrays, rows and paths; it runs no network and
reads no run folder. """
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

import data
import metricunet as M


# Fig. 1 (heatmap) and Fig. 8 (contours) as PNGs, without a plotting dependency: a PNG is a
# signature, an IHDR chunk (size, 8-bit RGB), one zlib-compressed IDAT chunk of the rows (each
# prefixed by filter type 0) and an IEND chunk, each chunk with its CRC-32 (PNG specification,
# ISO/IEC 15948).

def write_png(path: Path, rgb: np.ndarray) -> None:
    """An (H, W, 3) uint8 array as an 8-bit RGB PNG (standard library only: zlib, struct), written
    atomically."""
    import struct
    import zlib
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got {rgb.shape}")
    h, w, _ = rgb.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    # filter byte 0 per row
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], 1)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))
    data.atomic_write(path, lambda tmp: tmp.write_bytes(png))


def contour_of(mask2d: np.ndarray) -> np.ndarray:
    """The inner boundary of a 2-D mask (mask minus its 4-connected erosion): a one-pixel line drawn
    inside the object, so prediction and ground truth contours lie on the voxels that each mask
    actually holds."""
    return mask2d & ~ndimage.binary_erosion(mask2d)


def overlay_panel(image2d: np.ndarray, prob2d: np.ndarray, gt2d=None) -> np.ndarray:
    """One axial slice as two side-by-side RGB panels: left, the grey image with the prediction's
    contour (red, prob > 0.5) and, if given, the ground truth's (green; yellow where they coincide),
    as in Fig. 8; right, the prostate probability as a heatmap over the image (Fig. 1). Anterior is
    up, patient's right on the left (radiological view)."""
    g = np.clip(image2d, 0, 255).astype(np.float32)
    grey = np.repeat(g[..., None], 3, -1)
    left = grey.copy()
    pred_c = contour_of(prob2d > 0.5)
    if gt2d is not None:
        gt_c = contour_of(gt2d > 0)
        left[gt_c] = (0, 220, 0)
        left[gt_c & pred_c] = (255, 230, 0)
        left[pred_c & ~gt_c] = (255, 40, 40)
    else:
        left[pred_c] = (255, 40, 40)
    p = np.clip(prob2d, 0, 1)[..., None]
    heat = np.concatenate([np.clip(3 * p, 0, 1), np.clip(3 * p - 1, 0, 1),
                           np.clip(3 * p - 2, 0, 1)], -1) * 255
    # 'hot' colour map, blended by p
    right = grey * (1 - 0.6 * p) + heat * 0.6 * p
    # RAS (x, y) -> rows anterior-first
    view = lambda a: np.rot90(a.astype(np.uint8), 1)
    left, right = view(left), view(right)
    return np.concatenate([left, np.full((left.shape[0], 4, 3), 255, np.uint8), right], 1)


def overlay_figure(image: np.ndarray, prob: np.ndarray, gt=None, n_slices: int = 3,
                   size: int = 128) -> np.ndarray:
    """n_slices axial slices through the prostate (of the ground truth if given, else of the
    prediction; the middle of the volume if neither has any), each a size x size window around it,
    stacked vertically; each row as overlay_panel."""
    ref = gt if gt is not None and gt.any() else (prob > 0.5)
    centre = np.argwhere(ref).mean(0) if ref.any() else (np.array(image.shape) - 1) / 2
    zs = np.flatnonzero(ref.any((0, 1))) if ref.any() else np.arange(image.shape[2])
    picks = np.unique(zs[np.linspace(len(zs) * 0.2, len(zs) * 0.8,
                                     n_slices).astype(int).clip(0, len(zs) - 1)])
    lo = [int(np.clip(round(c) - size // 2, 0,
                      max(0, n - size))) for c, n in zip(centre[:2], image.shape[:2])]
    win = (slice(lo[0], lo[0] + size), slice(lo[1], lo[1] + size))
    rows = [overlay_panel(image[win + (z,)], prob[win + (z,)],
                          None if gt is None else gt[win + (z,)])
            for z in picks]
    sep = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([r for row in rows for r in (row, sep)][:-1], 0)


# -------------------------------------------------------------------------------------------- plots
# The paper's Fig. 6 and Fig. 7 and a Table III bar chart, drawn from the CSVs that ablation.py
# writes (nothing is retrained).

def main(argv=None):
    """`python figures.py`: draw every figure the CSVs in --results allow: for each rows study a
    Table III bar chart and Fig. 7; for each sensitivity study Fig. 6 with Table V's k beside it.
    Missing matplotlib or missing CSVs are one line each. Figures are written beside the tables they
    illustrate, replacing older ones (they are outputs of this command, like the tables)."""
    p = argparse.ArgumentParser(description=(
        "Fig. 6 (DSC/ASD against lambda, sigma and k), Fig. 7 (cross-entropy and validation DSC "
        "against steps) "
        "and a Table III bar chart as PNGs, from the CSVs in --results (needs matplotlib)."))
    p.add_argument("--results", default="results",
                   help="folder with the ablation's *_cases.csv and CSVs")
    a = p.parse_args(argv)
    res = Path(a.results)
    studies = sorted(res.glob("ablation_*_cases.csv")) + sorted(res.glob("sensitivity_*_cases.csv"))
    if not studies:
        sys.exit(f"error: no ablation_*_cases.csv or sensitivity_*_cases.csv in {res}; run python "
                 f"ablation.py first")
    try:
        import matplotlib
        matplotlib.use("Agg")                      # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: `python figures.py` needs matplotlib (pip install matplotlib); "
                 "nothing else in this project does")
    written = []
    for cases_csv in studies:
        stem = cases_csv.name[:-len("_cases.csv")]
        rows = read_csv(cases_csv)
        if stem.startswith("ablation_"):
            written.append(table3_figure(plt, rows, res / f"{stem}_table3.png", stem))
            conv = res / f"{stem}_convergence.csv"
            if conv.exists():
                written.append(fig7_figure(plt, read_csv(conv), res / f"{stem}_fig7.png", stem))
        else:
            written.append(fig6_figure(plt, rows, res / f"{stem}_fig6.png", stem))
    for path in written:
        print(f"wrote {path}")


def read_csv(path: Path) -> list[dict]:
    """A CSV as a list of dicts of strings (the figure code converts what it plots)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_figure(plt, fig, path: Path) -> Path:
    """PNG without the software-version stamp, so the same CSVs give the same bytes with one
    matplotlib."""
    fig.tight_layout()
    data.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, metadata={"Software": None}))
    plt.close(fig)
    return path


def table3_figure(plt, rows, path: Path, title: str) -> Path:
    """Table III as bars: mean DSC and mean ASD of each row (error bars: std over test cases x
    seeds). UNet, the baseline every p-value is taken against, is grey; the metric rows are blue.
    The DSC axis starts just below the lowest bar's error bar, so differences of a few hundredths
    stay visible."""
    labels = list(dict.fromkeys(r["row"] for r in rows))          # in the table's order
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, m, unit in zip(axes, ("DSC", "ASD"), ("", " (mm)")):
        v = [[float(r[m]) for r in rows if r["row"] == lab] for lab in labels]
        ax.bar(range(len(labels)), [np.mean(x) for x in v], yerr=[np.std(x) for x in v], capsize=3,
               color=["0.6"] + ["C0"] * (len(labels) - 1))
        ax.set_xticks(range(len(labels)),
                      [M.row_name(lab).replace("MetricUNet", "M") for lab in labels])
        ax.set_ylabel(m + unit)
        if m == "DSC":
            ax.set_ylim(max(0.0, min(np.mean(x) - np.std(x) for x in v) - 0.05), 1.0)
    fig.suptitle(f"Table III as bars: {title} (mean ± std; M- = MetricUNet-)", fontsize=10)
    return save_figure(plt, fig, path)


def fig7_figure(plt, conv, path: Path, title: str) -> Path:
    """Fig. 7: Stage-2 cross-entropy against the step (moving average over 20 steps, mean over seeds
    and folds) and validation DSC against the epoch, one line per Table II row. Cross-entropy is
    drawn on a log axis, as the interesting part is late training where the curves separate by a
    factor, not an offset."""
    labels = list(dict.fromkeys(r["row"] for r in conv))
    fig, (ax_ce, ax_val) = plt.subplots(1, 2, figsize=(9, 3.4))
    has_val = False
    for i, lab in enumerate(labels):
        mine = [r for r in conv if r["row"] == lab]
        steps = sorted({int(r["step"]) for r in mine if r["ce"]})
        ce = {s: np.mean([float(r["ce"]) for r in mine if r["ce"] and int(r["step"]) == s]) for s in steps}
        y = np.convolve([ce[s] for s in steps], np.ones(20) / 20,
                        mode="valid") if len(steps) >= 20 else []
        style = dict(color="0.4" if i == 0 else f"C{i - 1}", label=M.row_name(lab))
        ax_ce.plot(steps[len(steps) - len(y):], y, **style)
        # folds: no validation
        val = [r for r in mine if r["val_dsc"] and math.isfinite(float(r["val_dsc"]))]
        epochs = sorted({int(r["epoch"]) for r in val})
        dsc = [np.mean([float(r["val_dsc"]) for r in val if int(r["epoch"]) == e]) for e in epochs]
        if epochs:
            has_val = True
            ax_val.plot(epochs, dsc, marker="o", **style)
    ax_ce.set(xlabel="step", ylabel="cross-entropy (Eq. 3), moving average", yscale="log")
    ax_ce.legend(fontsize=7)
    ax_val.set(xlabel="epoch", ylabel="validation DSC")
    if not has_val:
        ax_val.text(0.5, 0.5, "no validation set\n(cross-validation folds)", ha="center",
                    transform=ax_val.transAxes)
    fig.suptitle(f"Fig. 7: convergence, {title}", fontsize=10)
    return save_figure(plt, fig, path)


def fig6_figure(plt, rows, path: Path, title: str) -> Path:
    """Fig. 6 (lambda, sigma) and Table V (k): mean DSC and ASD of MetricUNet-R against each
    hyper-parameter, the others at the paper's values (the 'R' row is every curve's paper-default
    point, marked with a star)."""
    def value_of(label, name):                  # 'R lam=0.1' -> 0.1; plain 'R' is the paper's value
        for part in label.split()[1:]:
            k, v = part.split("=")
            if k == name:
                return float(v)
        return None if " " in label else float(getattr(M.PAPER_DEFAULTS, name))
    swept = list(dict.fromkeys(p.split("=")[0] for r in rows for p in r["row"].split()[1:]))
    fig, axes = plt.subplots(2, len(swept), figsize=(10, 5.2), squeeze=False)
    for j, name in enumerate(swept):
        pts = sorted({value_of(r["row"], name) for r in rows} - {None})
        for i, m in enumerate(("DSC", "ASD")):
            v = [[float(r[m]) for r in rows if value_of(r["row"], name) == x] for x in pts]
            ax = axes[i, j]
            ax.errorbar(pts, [np.mean(x) for x in v], yerr=[np.std(x) for x in v], marker="o",
                        capsize=3)
            default = float(getattr(M.PAPER_DEFAULTS, name))
            if default in pts:
                ax.plot([default], [np.mean(v[pts.index(default)])], "r*", markersize=12,
                        label="paper default")
            ax.set(xscale="log" if name in ("lam", "k") else "linear",
                   ylabel=m + (" (mm)" if m == "ASD" else ""),
                   xlabel={"lam": "lambda (Eq. 4)", "sigma": "sigma (Eq. 2)",
                           "k": "k anchors (Table V)"}[name])
            ax.set_xticks(pts, [f"{x:g}" for x in pts])
            ax.minorticks_off()
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Fig. 6 / Table V: sensitivity of MetricUNet-R, {title} (mean ± std over test "
                 f"cases)", fontsize=10)
    return save_figure(plt, fig, path)


if __name__ == "__main__":
    main()
