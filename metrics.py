"""Evaluation metrics of Section IV-C (Eq. 5-8), Table VI's aRVD and Table IV's paired t-test.

    python metrics.py PRED_DIR GT_DIR [--csv FILE] [--compare OTHER_PRED_DIR] [--predicted-only]

PRED_DIR holds one NIfTI mask per case (CASE.nii.gz); GT_DIR is a folder of label masks or a
Decathlon / nnU-Net data set root (its labelsTr/ is used). Cases are paired by name; each pair must
share shape and affine. Every ground truth needs a prediction, so that a missed case cannot leave
the mean unnoticed; --predicted-only scores the cases PRED_DIR holds (a test split against the data
set's labelsTr) and says how many it left out. Prints a Table III-style summary (mean +- std and
median over cases), writes a per-case CSV and a summary JSON beside it, and with --compare adds
Table IV-style paired t-test p-values.

All functions take 3-D binary masks (any array; > 0 is foreground) and the voxel spacing in mm,
which may be anisotropic. The command reads the spacing from each file's affine (the length of each
voxel axis in world space), as nibabel, nnU-Net and ITK do, not from the header's pixdim, which some
converters leave stale. Distances are in mm. Masks are NIfTI (.nii, .nii.gz); PROMISE12's
CASE_segmentation files pair with a prediction named CASE.

Definitions (Section IV-C):
  Surface      A voxel of the mask with at least one of its 6 face neighbours outside the mask: the
               mask minus its erosion by the 3-D cross, ndimage.generate_binary_structure(3, 1).
               Voxels on the volume's border count as surface (outside it is background).
  d(a, Sur_b)  Euclidean distance in mm from a surface voxel centre of one mask to the nearest
               surface voxel centre of the other: scipy.ndimage.distance_transform_edt with
               sampling=spacing, computed only inside the two masks' joint bounding box plus a
               one-voxel margin (exactly the same values as over the whole volume: every surface
               voxel lies inside that box).
  ASD (Eq. 6)  mean of the two directed mean surface distances. (Not MedPy 0.5's `assd`, which
               pools both directions' distances into one mean: different when the two surfaces
               have different sizes, e.g. 9.7 vs 7.6 mm on a real case.)
  HD (Eq. 8)   the larger of the two directed maxima.
  HD95         two definitions are in common use:
               'max'    max(P95(d(Sur_seg -> Sur_gt)), P95(d(Sur_gt -> Sur_seg))): Eq. 8 with
                        each max replaced by a 95th percentile. MONAI's
                        compute_hausdorff_distance(percentile=95) and DeepMind's surface-distance
                        compute_robust_hausdorff(.., 95) use this. DEFAULT.
               'pooled' P95 of both directions' distances pooled together: MedPy's
                        metric.binary.hd95. Percentiles use numpy's default linear interpolation.
  aRVD         |(|seg| - |gt|) / |gt|| * 100, in percent (Table VI).
Empty masks (defined, and never flattering; a missed prostate must not vanish from the mean):
  both empty   DSC = PPV = SEN = 1, aRVD = 0, all distances 0 (a correct "nothing here").
  one empty    DSC = PPV = SEN = 0; distances are set to the volume's diagonal in mm, the largest
               distance the volume allows, so the case counts as the worst possible in every
               mean; aRVD = 100 if the prediction is empty; undefined (NaN in the CSV, null in the
               JSON) if the ground truth is, and then left out of aRVD's mean, which says over how
               many cases it ran. The summary also counts the cases with an empty prediction.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

import data

METRICS = ("DSC", "ASD", "HD95", "HD", "SEN", "PPV", "aRVD")
HD95_DEFINITIONS = ("max", "pooled")


def _foreground(x) -> np.ndarray:
    """x > 0 as a bool array; a bool array is used as it is (no pass over the volume)."""
    x = np.asarray(x)
    return x if x.dtype == bool else x > 0


def _as_pair(pred, gt, spacing):
    pred, gt = _foreground(pred), _foreground(gt)
    if pred.ndim != 3 or gt.ndim != 3:
        raise ValueError(f"masks must be 3-D, got {pred.shape} and {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be three positive numbers in mm, got {spacing.tolist()}")
    return pred, gt, spacing


def overlap_metrics(pred, gt) -> dict:
    """Eq. 5 (DSC), Eq. 7 (PPV, SEN) and Table VI's aRVD from voxel counts."""
    tp = int(np.count_nonzero(pred & gt))
    n_seg, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if n_seg == 0 and n_gt == 0:
        return dict(DSC=1.0, PPV=1.0, SEN=1.0, aRVD=0.0)
    return dict(DSC=2 * tp / (n_seg + n_gt),
                PPV=tp / n_seg if n_seg else 0.0,
                SEN=tp / n_gt if n_gt else 0.0,
                # relative to nothing: undefined
                aRVD=abs(n_seg - n_gt) / n_gt * 100 if n_gt else math.nan)


def _surface(mask):
    """Mask minus its erosion by the 6-connected 3-D cross; border_value=0: the volume edge is
    surface."""
    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1),
                                          border_value=0)


def bounding_box(mask: np.ndarray):
    """[lo, hi) per axis of a bool mask's True voxels, or None if it has none, in about one pass
    over the volume: a projection along the last (contiguous) axis gives the first two axes' ranges,
    then the last axis's range is read inside that (small) box only."""
    plane = mask.any(axis=2)                                   # the one whole-volume pass
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if len(rows) == 0:
        return None
    sub = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    deep = np.flatnonzero(sub.any(axis=(0, 1)))
    return np.array([[rows[0], rows[-1] + 1], [cols[0], cols[-1] + 1], [deep[0], deep[-1] + 1]])


def joint_bbox(pred, gt, margin: int = 1, boxes=None):
    """Slices of the bounding box of pred | gt grown by `margin` voxels, clipped to the volume (None
    if both masks are empty). `boxes`: the two masks' bounding_box results, if already known."""
    boxes = [b for b in (boxes or (bounding_box(pred), bounding_box(gt))) if b is not None]
    if not boxes:
        return None
    lo = np.min([b[:, 0] for b in boxes], axis=0) - margin
    hi = np.max([b[:, 1] for b in boxes], axis=0) + margin
    return tuple(slice(max(int(a), 0), min(int(b), n)) for a, b, n in zip(lo, hi, pred.shape))


def directed_surface_distances(pred, gt, spacing, crop: bool = True):
    """d(Sur_seg -> Sur_gt) and d(Sur_gt -> Sur_seg) in mm, for two non-empty masks (Eq. 6 and 8).

    crop=True runs the distance transforms inside joint_bbox only; crop=False on the whole volume
    (the reference that bench.py and the tests compare against)."""
    if crop:
        box = joint_bbox(pred, gt)
        pred, gt = pred[box], gt[box]
    s_pred, s_gt = _surface(pred), _surface(gt)
    # EDT of the complement of a surface = distance from every voxel to that surface's nearest voxel
    to_gt = ndimage.distance_transform_edt(~s_gt, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing)
    return to_gt[s_pred], to_pred[s_gt]


def hd95_from(d_seg_gt, d_gt_seg, definition: str = "max") -> float:
    if definition == "max":
        return float(max(np.percentile(d_seg_gt, 95), np.percentile(d_gt_seg, 95)))
    if definition == "pooled":
        return float(np.percentile(np.concatenate([d_seg_gt, d_gt_seg]), 95))
    raise ValueError(f"hd95 definition must be one of {HD95_DEFINITIONS}, got {definition!r}")


def distance_metrics(pred, gt, spacing, hd95_definition: str = "max", crop: bool = True,
                     shape=None) -> dict:
    """ASD (Eq. 6), HD (Eq. 8) and HD95 in mm, with the empty-mask conventions of the module
    docstring. shape: the whole volume's shape when pred and gt are already crops of it (for the
    empty-mask diagonal)."""
    any_pred, any_gt = pred.any(), gt.any()
    if not any_pred and not any_gt:
        return dict(ASD=0.0, HD=0.0, HD95=0.0)
    if not (any_pred and any_gt):
        # the volume's diagonal
        worst = float(np.linalg.norm(np.asarray(shape or pred.shape) * spacing))
        return dict(ASD=worst, HD=worst, HD95=worst)
    d1, d2 = directed_surface_distances(pred, gt, spacing, crop=crop)
    return dict(ASD=float(0.5 * (d1.mean() + d2.mean())),
                HD=float(max(d1.max(), d2.max())),
                HD95=hd95_from(d1, d2, hd95_definition))


def evaluate(pred, gt, spacing=(1.0, 1.0, 1.0), hd95_definition: str = "max",
             crop: bool = True) -> dict:
    """All metrics of one case: DSC, ASD, HD95, HD, SEN, PPV, aRVD.

    Why the union box is enough for every metric: outside the bounding box of pred | gt both masks
    are background by definition, so every voxel count (|seg|, |gt|, |seg & gt|) is the same inside
    the box as over the volume, and every surface voxel lies inside it. The one-voxel margin keeps
    the box's edge background, so the erosion that finds the surface sees what it sees in the whole
    volume (where the box is clipped by the volume's edge, the edge is the volume's own). So each
    bool mask is read once, to find its box, and all the rest (counts, surfaces, distance
    transforms) runs on the box. crop=False computes everything on the whole volume instead (the
    reference the tests and bench.py compare against)."""
    pred, gt, spacing = _as_pair(pred, gt, spacing)
    shape = pred.shape
    if crop:
        box = joint_bbox(pred, gt)
        box = box or (slice(0, 0),) * 3                         # both empty: nothing to look at
        pred, gt = pred[box], gt[box]
    out = overlap_metrics(pred, gt)
    out.update(distance_metrics(pred, gt, spacing, hd95_definition, crop=False, shape=shape))
    return {k: out[k] for k in METRICS}


# individual metrics by name, for readers who want one
def dsc(pred, gt):
    return overlap_metrics(*_as_pair(pred, gt, (1, 1, 1))[:2])["DSC"]


def asd(pred, gt, spacing):
    return distance_metrics(*_as_pair(pred, gt, spacing))["ASD"]


def hd95(pred, gt, spacing, definition: str = "max"):
    return distance_metrics(*_as_pair(pred, gt, spacing), hd95_definition=definition)["HD95"]


# ----------------------------------------------------------------------- summaries (Tables III, IV)

def summarize(rows: list[dict]) -> dict:
    """mean, std (sample, ddof=1) and median of each metric over cases, plus the count of empty
    predictions."""
    out = {"cases": len(rows),
           "empty_predictions": sum(1 for r in rows if r.get("empty_prediction"))}
    for m in METRICS + (("pieces",) if rows and all("pieces" in r for r in rows) else ()):
        v = np.array([r[m] for r in rows], dtype=np.float64)
        # aRVD is undefined (NaN) where the ground truth is empty
        v = v[np.isfinite(v)]
        out[m] = dict(mean=float(v.mean()) if len(v) else math.nan,
                      std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                      median=float(np.median(v)) if len(v) else math.nan, n=int(len(v)))
    return out


def format_summary(summary: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'metric':<6} {'mean +- std':>22} {'median':>10}   (n = {summary['cases']}, "
                 f"empty predictions: {summary['empty_predictions']})")
    for m in METRICS + (("pieces",) if "pieces" in summary else ()):
        s = summary[m]
        unit = " mm" if m in ("ASD", "HD95", "HD") else (" %" if m == "aRVD" else "")
        partial = s.get("n", summary["cases"]) != summary["cases"]
        n = f"   (over {s['n']} cases: undefined for the others)" if partial else ""
        lines.append(f"{m:<6} {s['mean']:>10.4f} +- {s['std']:<8.4f} {s['median']:>10.4f}{unit}{n}")
    return "\n".join(lines)


def paired_pvalues(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Table IV: two-sided paired t-test (scipy.stats.ttest_rel) per metric over the cases both
    hold."""
    b = {r["case"]: r for r in rows_b}
    common = [r for r in rows_a if r["case"] in b]
    out = {}
    for m in METRICS:
        x = np.array([r[m] for r in common], float)
        y = np.array([b[r["case"]][m] for r in common], float)
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        # no test when fewer than two pairs or no pair differs (the t statistic is undefined)
        out[m] = float(stats.ttest_rel(x, y).pvalue) if len(x) > 1 and np.any(x != y) else 1.0
    return out


# -------------------------------------------------------------------------------------------- files

def mask_folder(folder: Path) -> Path:
    """A data set root's labelsTr/ (Decathlon, nnU-Net), or the folder itself."""
    folder = Path(folder)
    return folder / "labelsTr" if (folder / "labelsTr").is_dir() else folder


def nifti_files(folder: Path, role: str = "gt") -> dict:
    """{case: path} of the masks in a folder. A folder that holds PROMISE12's CASE_segmentation
    files beside the images gives those as ground truth (role 'gt') and never as predictions (role
    'pred')."""
    folder = mask_folder(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    paths = data.nifti_files(folder)
    segs = [p for p in paths if p.name.split(".nii")[0].endswith(data.SEGMENTATION_SUFFIX)]
    if role == "gt" and segs:
        paths = segs
    elif role == "pred":
        paths = [p for p in paths if p not in segs]
    files = {data.case_name(p): p for p in paths}
    if not files:
        formats = (".mhd", ".mha", ".nrrd", ".dcm", ".raw")
        other = sorted({p.suffix for p in folder.iterdir() if p.suffix in formats})
        hint = (f"; found {', '.join(other)} files: convert them to NIfTI first (e.g. SimpleITK)"
                if other else "")
        raise FileNotFoundError(f"no NIfTI files (.nii, .nii.gz) in {folder}{hint}")
    return files


def spacing_from_affine(affine) -> np.ndarray:
    """Voxel size in mm along each array axis: the length of each column of the affine's 3x3 part.
    This is the geometry nibabel, nnU-Net and ITK use; the header's pixdim can disagree with it
    (stale converters)."""
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(0))


def load_mask(path: Path):
    """A 3-D mask and its affine; a clear error naming the file if it cannot be read."""
    import nibabel as nib   # imported here so the metric functions need only numpy and scipy
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for truncated / corrupted files
        raise ValueError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: mask must be 3-D, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{path}: mask holds NaN or infinite values")
    lo, hi = data.min(), data.max()
    if lo < 0 or hi > 255 or (data.dtype.kind == "f" and not np.array_equal(data, np.round(data))):
        raise ValueError(f"{path}: not a label mask (values {lo:g} to {hi:g}; a mask holds integer "
                         f"labels 0 to 255); is it an image?")
    spacing = spacing_from_affine(img.affine)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"{path}: voxel spacing {spacing.tolist()} mm from its affine; fix the "
                         f"file's sform/qform")
    return data > 0, img.affine, spacing


def count_pieces(mask: np.ndarray) -> int:
    """Pieces of a predicted mask (data.pieces: 26-connected components), counted inside its
    bounding box, where every piece lies (one pass over the volume)."""
    box = bounding_box(mask)
    return 0 if box is None else data.pieces(mask[tuple(slice(a, b) for a, b in box)])


def evaluate_folders(pred_dir, gt_dir, hd95_definition: str = "max", log=print,
                     only=None) -> list[dict]:
    """Score every ground-truth case (or the cases named in `only`) against its prediction."""
    preds, gts = paired_files(pred_dir, gt_dir, only)
    rows = []
    for i, case in enumerate(sorted(gts), 1):
        p, p_aff, _ = load_mask(preds[case])
        g, g_aff, spacing = load_mask(gts[case])
        if p.shape != g.shape:
            raise ValueError(f"case {case}: prediction shape {p.shape} != ground truth shape "
                             f"{g.shape}")
        differ = data.affine_mismatch(p_aff, g_aff)
        if differ:
            raise ValueError(f"{preds[case]}: prediction and ground truth {differ}; predict on the "
                             f"ground truth's grid (infer.py writes masks on the input's grid)")
        row = {"case": case, **evaluate(p, g, spacing, hd95_definition),
               "pieces": count_pieces(p), "empty_prediction": not p.any()}
        rows.append(row)
        log(f"[{i}/{len(gts)}] {case}: DSC {row['DSC']:.4f}  ASD {row['ASD']:.3f} mm  HD95 "
            f"{row['HD95']:.3f} mm")
    return rows


def paired_files(pred_dir, gt_dir, only=None):
    """({case: prediction}, {case: ground truth}) for every ground-truth case (or those in `only`);
    a clear error if the two folders are one, or if a prediction is missing."""
    if mask_folder(pred_dir).resolve() == mask_folder(gt_dir).resolve():
        raise ValueError(f"{pred_dir} is the ground-truth folder itself; give the folder of "
                         f"predictions")
    preds, gts = nifti_files(Path(pred_dir), "pred"), nifti_files(Path(gt_dir), "gt")
    if only is not None:
        gts = {k: v for k, v in gts.items() if k in set(only)}
        if not gts:
            raise ValueError(f"{gt_dir}: none of the cases {', '.join(sorted(only)[:3])} ... has a "
                             f"ground truth there; check the case names")
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise ValueError(f"{pred_dir}: no prediction for case(s) {', '.join(missing)} of {gt_dir}; "
                         f"to score only the cases it holds, pass --predicted-only")
    return preds, gts


def write_report(rows: list[dict], csv_path: Path, extra: dict | None = None) -> dict:
    """Per-case CSV at csv_path and the summary (mean +- std, median) as JSON beside it."""
    import io
    buf = io.StringIO()
    fields = ["case", *METRICS, "pieces", "empty_prediction"]
    w = csv.DictWriter(buf, fieldnames=[f for f in fields if f in rows[0] or f in METRICS])
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    data.atomic_write_text(csv_path, buf.getvalue())
    summary = summarize(rows)
    if extra:
        summary.update(extra)
    data.atomic_write_text(Path(csv_path).with_suffix(".summary.json"),
                           json.dumps(json_safe(summary), indent=2, allow_nan=False))
    return summary


def write_csv(path: Path, rows: list[dict], fields=None) -> None:
    """A list of dicts as a CSV (columns: `fields`, or the first row's keys), written atomically."""
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fields or list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    data.atomic_write_text(path, buf.getvalue())


class CsvLog:
    """train.py's log.csv: per-step losses and per-epoch validation, the data of Fig. 7's curves.
    Appended to by the master process only; rows already logged survive a --resume, and rows past
    the last checkpoint do not appear twice (truncate_after)."""
    FIELDS = ["stage", "epoch", "step", "lr", "loss", "ce", "random", "hard", "contour", "val_dsc",
              "val_centre_mm", "seconds"]

    def __init__(self, path: Path, resume: bool):
        self.path = Path(path)
        if not (resume and self.path.exists()):
            data.atomic_write_text(self.path, ",".join(self.FIELDS) + "\r\n")

    def truncate_after(self, stage: int, epochs_done: int) -> None:
        """At the start of a stage: drop that stage's rows of the epoch a kill interrupted (after
        `epochs_done` finished epochs; 0 when it starts afresh), so no step is in the log twice
        after --resume (Fig. 7's curves and ablation.py's training time read this log). Rows of
        finished epochs are never touched: they are the history the checkpoint continues."""
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["stage"]) != stage or int(r["epoch"]) <= epochs_done]
        if len(keep) != len(rows):
            write_csv(self.path, keep, self.FIELDS)

    def write(self, rows: list[dict]) -> None:
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.FIELDS)
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def json_safe(obj):
    """NaN and infinities -> null: strict JSON readers reject them (an undefined aRVD is NaN)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def check_report_path(csv_path: Path, input_dirs, overwrite: bool) -> None:
    """The report never lands inside an input folder and never replaces a file unless
    --overwrite."""
    for d in input_dirs:
        for folder in {Path(d).resolve(), mask_folder(d).resolve()}:
            if folder == csv_path.resolve().parent or folder in csv_path.resolve().parents:
                raise ValueError(f"--csv {csv_path} lies inside the input folder {d}; write the "
                                 f"report elsewhere")
    for path in (csv_path, csv_path.with_suffix(".summary.json")):
        if path.exists() and not overwrite:
            raise ValueError(f"--csv: {path} exists; pass --overwrite to replace it, or choose "
                             f"another name")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred_dir")
    p.add_argument("gt_dir")
    p.add_argument("--csv", help="per-case CSV to write (a .summary.json is written beside it)")
    p.add_argument("--compare", metavar="OTHER_PRED_DIR",
                   help="paired t-test against another method's predictions")
    p.add_argument("--hd95", choices=HD95_DEFINITIONS, default="max",
                   help="HD95 definition (see module docstring)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --csv and its summary")
    p.add_argument("--predicted-only", action="store_true",
                   help="score only the cases PRED_DIR holds (e.g. a test split against the data "
                        "set's labelsTr); by default a ground truth without a prediction is an "
                        "error, so that a missed case never leaves the mean unnoticed")
    args = p.parse_args(argv)
    try:
        if args.csv:
            inputs = [args.pred_dir, args.gt_dir] + ([args.compare] if args.compare else [])
            check_report_path(Path(args.csv), inputs, args.overwrite)
        only = sorted(nifti_files(Path(args.pred_dir), "pred")) if args.predicted_only else None
        paired_files(args.pred_dir, args.gt_dir, only)   # every folder checked before any work
        if args.compare:
            paired_files(args.compare, args.gt_dir, only)
        rows = evaluate_folders(args.pred_dir, args.gt_dir, args.hd95, only=only)
        summary = summarize(rows)
        left = len(nifti_files(Path(args.gt_dir), "gt")) - len(rows)
        print(format_summary(summary, f"\n{args.pred_dir} vs {args.gt_dir}"
                             + (f" ({left} ground truths without a prediction left out, as "
                                f"--predicted-only asks)" if left else "")))
        extra = {"ground_truths_left_out": left} if left else {}
        if args.compare:
            other = evaluate_folders(args.compare, args.gt_dir, args.hd95, log=lambda *_: None,
                                     only=only)
            print(format_summary(summarize(other), f"\n{args.compare} vs {args.gt_dir}"))
            pv = paired_pvalues(rows, other)
            print("\npaired t-test p-values (Table IV):  "
                  + "  ".join(f"{m} {v:.4g}" for m, v in pv.items()))
            extra["p_values_vs_" + Path(args.compare).name] = pv
        if args.csv:
            write_report(rows, Path(args.csv), extra)
            print(f"\nwrote {args.csv} and {Path(args.csv).with_suffix('.summary.json')}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                               # e.g. a read-only folder for --csv
        print(f"error: cannot write {e.filename or args.csv}: {e.strerror}; choose a writable "
              f"--csv", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    data.run_command(main, "nothing was written")
