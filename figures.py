"""Pictures: Fig. 1 / Fig. 8 overlays of a mask on its scan, Fig. 5 from the real samplers, the
embedding space, and Fig. 6, Fig. 7 and Table III from the ablation's CSVs.

    python figures.py [--results results]     # Fig. 6, Fig. 7, Table III bars (matplotlib)
    python figures.py samplers [--run RUN]    # Fig. 5, live: what the three samplers return
    python infer.py RUN IMAGE OUT --png DIR   # the overlays: overlay_figure and write_png below
    python ablation.py --study embedding      # the embedding space, measured and drawn (PCA)

Two kinds of picture, two ways of drawing. The overlays (infer.py --png) are drawn pixel by pixel in
numpy and written by a small PNG encoder of the standard library, so inference needs nothing beyond
the core packages. The plots use matplotlib, imported inside `pyplot` only: nothing else in this
project needs it. Everything here takes arrays, rows and paths; the one network it runs is a trained
run's Stage 2 on one patch, for Fig. 5's y_hat.
"""
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
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
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
        "against steps) and a Table III bar chart as PNGs, from the CSVs in --results (needs "
        "matplotlib)."))
    p.add_argument("--results", default="results",
                   help="folder with the ablation's *_cases.csv and CSVs")
    a = p.parse_args(argv)
    res = Path(a.results)
    studies = sorted(res.glob("ablation_*_cases.csv")) + sorted(res.glob("sensitivity_*_cases.csv"))
    if not studies:
        sys.exit(f"error: no ablation_*_cases.csv or sensitivity_*_cases.csv in {res}; run python "
                 f"ablation.py first")
    plt = pyplot()
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


def pyplot():
    """matplotlib, imported here only (files, no display): nothing else in this project needs it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: `python figures.py` needs matplotlib (pip install matplotlib); "
                 "nothing else in this project does")
    return plt


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
        ce = {s: np.mean([float(r["ce"]) for r in mine if r["ce"] and int(r["step"]) == s])
              for s in steps}
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


# ------------------------------------------------------------------------------- Fig. 5, live
# The paper's Fig. 5 is a cartoon of the three sampling strategies. Here the very functions training
# calls draw their tuples on one training-sized patch (64 x 64, the middle slice's label), and the
# picture shows what they returned: no sampler is re-implemented for the figure.

def sampler_tuples(labels2d: np.ndarray, probs2d: np.ndarray, k: int = 20, m: int = 1,
                   tau: float = 0.1, seed: int = 0) -> dict:
    """{strategy: (anchor, positive, negative, valid)} for one patch, from metricunet's samplers in
    Table II's order (random, hard, contour) and one seeded generator, as metricunet.total_loss
    draws them in training."""
    import torch
    labels = torch.from_numpy(np.ascontiguousarray(labels2d)).long()[None]
    probs = torch.from_numpy(np.ascontiguousarray(probs2d)).float()[None]
    g = torch.Generator().manual_seed(seed)
    return {"random": M.random_sampler(labels, k, m, g),
            "hard": M.focal_hard_negative_sampler(labels, probs, k, m, tau, g),
            "contour": M.contour_aware_sampler(labels, k, m, g)}


def stand_in_probability(label2d: np.ndarray) -> np.ndarray:
    """y_hat when no trained run is given: the label blurred (sigma 3 px) and shifted by 3 px, a
    network that finds the prostate but misses its edge on one side. Said so in the figure."""
    blurred = ndimage.gaussian_filter(label2d.astype(np.float32), 3.0)
    return np.clip(ndimage.shift(blurred, (3, 2), order=1, mode="nearest"), 0, 1)


# How to read the picture against Section III-B-2: random anchors fall anywhere in the prostate;
# focal-hard anchors only where the network is wrong by more than tau (the yellow band), so they
# move as training goes on; contour anchors sit on the boundary, where the paper says a plain UNet
# fails. Every anchor's positives come from the prostate and its negatives from the background of
# the same patch, as Eq. 2's sets J and M require; the lines join each anchor to its own positives
# and negatives.
def samplers_figure(plt, image2d, label2d, probs2d, tuples: dict, path: Path, note: str,
                    tau: float = 0.1) -> Path:
    """Top row: each strategy's anchors (yellow), positives (green) and negatives (red), joined to
    their anchor, over the patch and the ground-truth contour. Bottom row: y_hat, the hard map of
    Eq. 1 (|y_hat - y| > tau) with the positive hard voxels the anchors come from, and the contour
    set of contour-aware sampling. Image axes as in overlay_panel (anterior up)."""
    W = label2d.shape[1]
    y = label2d > 0
    hard = np.abs(probs2d - y) > tau
    contour = y & ~ndimage.binary_erosion(y, np.ones((3, 3)), border_value=1)
    fig, axes = plt.subplots(2, 3, figsize=(10, 7))
    view = lambda a: np.rot90(a, 1)
    titles = {"random": "i) random", "hard": "ii) focal hard negative (Eq. 1)",
              "contour": "iii) contour-aware"}
    for ax, (name, (anchor, positive, negative, valid)) in zip(axes[0], tuples.items()):
        ax.imshow(view(image2d), cmap="gray")
        ax.contour(view(y), levels=[0.5], colors="deepskyblue", linewidths=1)
        for a, ps, ns, ok in zip(anchor[0].tolist(), positive[0].tolist(), negative[0].tolist(),
                                 valid[0].tolist()):
            if not ok:
                continue
            rc = lambda i: (i // W, i % W)             # flat index -> (x, y) of the patch
            ax_, ay_ = rc(a)
            for i, colour in [(i, "lime") for i in ps] + [(i, "red") for i in ns]:
                bx, by = rc(i)
                ax.plot([ax_, bx], [W - 1 - ay_, W - 1 - by], color=colour, lw=0.5, alpha=0.5)
                ax.plot(bx, W - 1 - by, "+" if colour == "lime" else "x", color=colour, ms=5)
            ax.plot(ax_, W - 1 - ay_, "o", color="yellow", ms=4)
        ax.set_title(f"{titles[name]}: {int(valid[0].sum())} anchors", fontsize=9)
    maps = [(probs2d, "y_hat: prostate probability", "magma"),
            (np.where(hard & y, 2, hard.astype(int)), f"Eq. 1, |y_hat - y| > {tau}: missed "
             f"prostate (yellow,\nthe anchors of ii) and false positives (teal)", "viridis"),
            (contour, "the contour set of iii)", "gray")]
    for ax, (m, title, cmap) in zip(axes[1], maps):
        ax.imshow(view(m), cmap=cmap)
        ax.contour(view(y), levels=[0.5], colors="deepskyblue", linewidths=1)
        ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Fig. 5, live: metricunet's samplers on one 64x64 patch (k=20, m=1). {note}",
                 fontsize=9)
    return save_figure(plt, fig, path)


def samplers_main(argv=None):
    """`python figures.py samplers`: Fig. 5 from the real samplers, on a phantom patch or a case of
    --data, with y_hat from a trained run's Stage 2 (--run) or from a stated stand-in."""
    import torch
    p = argparse.ArgumentParser(prog="figures.py samplers", description=samplers_main.__doc__)
    p.add_argument("--data", help="data set (default: a one-case phantom, in a temporary folder)")
    p.add_argument("--channel", default="0", help="channel of 4-D images, by index or name")
    p.add_argument("--run", help="a train.py run folder: y_hat from its Stage 2 (stage2_best.pt)")
    p.add_argument("--out", default="results/fig5_samplers.png", help="the PNG to write")
    p.add_argument("--seed", type=int, default=0, help="the samplers' generator")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.data and Path(a.data).resolve() in out.resolve().parents:
        sys.exit(f"error: --out {out} lies inside the data set {a.data}; write it elsewhere")
    if out.exists() and not a.overwrite:
        sys.exit(f"error: {out} exists; pass --overwrite to replace it, or choose another --out")
    plt = pyplot()
    try:
        if a.data:
            case = data.find_cases(a.data, a.channel)[0]
            prep = data.preprocess(case)
        else:
            import tempfile
            import phantom
            with tempfile.TemporaryDirectory() as tmp:
                prep = data.preprocess(data.find_cases(phantom.make_phantom(f"{tmp}/ph", cases=1,
                                                                            log=None))[0])
        crop, lab = data.prostate_crop(prep)
        c = np.round(data.label_centre(lab)).astype(int)
        win = tuple(slice(int(np.clip(v - 32, 0, 128 - 64)), int(np.clip(v - 32, 0, 128 - 64)) + 64)
                    for v in c[:2])
        x3 = crop[win + (slice(c[2] - 1, c[2] + 2),)].astype(np.float32) / 255.0   # (64, 64, 3)
        label2d = lab[win + (c[2],)]
        if a.run:
            ck = M.load_checkpoint(Path(a.run) / "stage2_best.pt")
            net = M.build_model(ck["args"]["config"], width=ck["args"]["width"])
            net.load_state_dict(ck["model"])
            with torch.no_grad():
                logits, _ = net.eval()(torch.from_numpy(x3.transpose(2, 0, 1).copy())[None])
            probs2d = torch.softmax(logits, 1)[0, 1].numpy()
            note = f"y_hat from {a.run}."
        else:
            probs2d = stand_in_probability(label2d)
            note = "y_hat: a stand-in (the label blurred and shifted), no trained run given."
    except (ValueError, OSError, KeyError, RuntimeError) as e:     # DataError is a ValueError
        sys.exit(f"error: {e}")
    tuples = sampler_tuples(label2d, probs2d, seed=a.seed)
    print(f"wrote {samplers_figure(plt, x3[..., 1] * 255, label2d, probs2d, tuples, out, note)}")


# ------------------------------------------------------------------- the embedding space, drawn

def pca_2d(f: np.ndarray) -> tuple:
    """The first two principal axes of feature rows f (V, d), by SVD of the centred rows (numpy
    only): (projection (V, 2), mean (d,), axes (2, d))."""
    mean = f.mean(0)
    _, _, vt = np.linalg.svd(f - mean, full_matrices=False)
    return (f - mean) @ vt[:2].T, mean, vt[:2]


def embedding_figure(plt, panels, path: Path, case: str, n: int = 1500, seed: int = 0) -> Path:
    """One row per network: left, a seeded sample of one held-out slice's voxel features projected
    on their first two principal axes (background grey, prostate blue, contour voxels orange);
    right, every voxel of the slice coloured by its first principal component. panels: [(title,
    features (V, d), prostate (V,), contour (V,))] of one 128 x 128 slice."""
    fig, axes = plt.subplots(len(panels), 2, figsize=(7, 3.3 * len(panels)), squeeze=False)
    rng = np.random.default_rng(seed)
    for (title, f, y, contour), (ax_pca, ax_map) in zip(panels, axes):
        proj, mean, axes2 = pca_2d(f[rng.choice(len(f), min(n, len(f)), replace=False)])
        every = (f - mean) @ axes2.T
        for m, colour, name in ((~y, "0.6", "background"), (y & ~contour, "tab:blue", "prostate"),
                                (contour, "tab:orange", "contour")):
            pts = every[m][rng.choice(int(m.sum()), min(n // 3, int(m.sum())), replace=False)]
            ax_pca.scatter(pts[:, 0], pts[:, 1], s=3, c=colour, label=name, alpha=0.6)
        ax_pca.set(title=f"{title}: PCA of conv6d", xlabel="PC 1", ylabel="PC 2")
        ax_pca.legend(fontsize=7, markerscale=3)
        side = int(round(len(f) ** 0.5))
        lo, hi = np.percentile(every[:, 0], [1, 99])       # a few extreme voxels set no scale
        pc1 = np.rot90(every[:, 0].reshape(side, side), 1)
        ax_map.imshow(pc1, cmap="coolwarm", vmin=lo, vmax=hi)
        ax_map.contour(np.rot90(y.reshape(side, side), 1), levels=[0.5], colors="k", linewidths=0.8)
        ax_map.set(title=f"{title}: PC 1", xticks=[], yticks=[])
    fig.suptitle(f"The embedding space on a held-out slice of {case}", fontsize=10)
    return save_figure(plt, fig, path)


if __name__ == "__main__":
    command = main if sys.argv[1:2] != ["samplers"] else lambda: samplers_main(sys.argv[2:])
    data.run_command(command, "the figures written so far are complete")
