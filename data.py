"""Data: the NIfTI pipeline of Sections III-A and IV-B, from a data set folder to training patches.

    python data.py DATA_DIR [--channel T2] [--cache DIR]   # cases and split; preprocess and cache

Pipeline, in the order it runs (each step names the paper's section):
  find_cases        Decathlon (dataset.json, imagesTr/ + labelsTr/, 4-D images with a channel axis),
                    nnU-Net (CASE_0000.nii.gz + CASE.nii.gz) or plain images/ + labels/ folders.
  load_case         nibabel; checks the file, 3-D-ness, NaN/inf, spacing > 0, label shape, affine.
                    Arrays are reoriented to RAS (axis 2 = inferior -> superior: axial slices).
  preprocess        Section IV-B: resample to 1x1x1 mm (trilinear), crop the body (threshold +
                    largest connected component), normalise intensities to [0, 255] (uint8), find
                    the femoral-head reference centre (Section III-A). Cached as .npz, so epochs
                    and runs never resample again.
  stage1_volume     Section III-A: the body image at 1/4 size (trilinear).
  crop_around       Section III-A: the 128^3 crop at 1 mm around a centre, padded past the volume.
  PatchDataset      Section III-A / IV-B: 2.5D training patches, 64 x 64 x 5 of the 1/4-size image
                    (Stage 1) or 64 x 64 x 3 of the crop (Stage 2, 500 per image), label of the
                    middle slice; optional on-the-fly augmentation (augment_patch; paper is
                    silent), a new draw every epoch through EpochIndexSampler.
  split_cases       Section IV-A: a deterministic 70 / 10 / 20 split (or cross-validation folds).
  list_and_split    train.py's entry: the cases and their split; CachedCases reads the cache lazily.
  to_original_grid  the inverse of preprocess: a 1-mm probability map back onto the input's grid.
  atomic_write      every file this project writes goes through it (no half-written files).

Nothing here writes into an input folder: caches go to a separate folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

# Section IV-B and III-A sizes (the paper's values are the defaults)
SPACING_MM = 1.0          # resample to 1 x 1 x 1 mm
STAGE1_FACTOR = 4         # Stage 1 works on the 1/4-size image
CROP_SIZE = 128           # Stage-2 prostate region, 128^3 at 1 mm
# Paper is silent on the CT window behind "normalised to [0, 255]": we use the soft-tissue window W
# 400 / L 40 (-160 .. 240 HU), which keeps 1.6 HU per grey level for the prostate's few tens of HU
# of contrast.
CT_WINDOW_HU = (-160.0, 240.0)
# Paper is silent on MRI (used only in Section IV-G): percentiles 0.5 and 99.5 of the body voxels
# map to 0, 255.
MR_PERCENTILES = (0.5, 99.5)
CT_BODY_HU = -500.0       # body = HU above this (air is -1000, fat -100)
CT_BONE_HU = 200.0        # femoral heads: bone threshold
# coarser voxels get a warning: a 30-40 mm prostate spans only a few such slices
MAX_SLICE_MM = 6.0


class DataError(ValueError):
    """Bad input data; the message names the file."""


# ------------------------------------------------------------------------------------------ reading

@dataclass
class Case:
    name: str
    image: Path
    label: Path | None
    channel: int = 0
    modality: str = "auto"   # 'ct', 'mr' or 'auto'


NIFTI = (".nii.gz", ".nii")
# PROMISE12: Case00.nii.gz (image), Case00_segmentation.nii.gz
SEGMENTATION_SUFFIX = "_segmentation"
NNUNET_CHANNEL = "_0000"                   # nnU-Net: CASE_0000.nii.gz is channel 0 of case CASE


def case_name(path: Path) -> str:
    """The one case-naming rule of every entry point: the file name without .nii / .nii.gz, and
    without PROMISE12's label suffix ('Case00_segmentation.nii.gz' -> 'Case00'). Any other ending is
    part of the name ('pat_0001.nii.gz' -> 'pat_0001'); nnU-Net's channel suffix belongs to images:
    image_case_name."""
    name = Path(path).name
    for ext in NIFTI:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return name[: -len(SEGMENTATION_SUFFIX)] if name.endswith(SEGMENTATION_SUFFIX) else name


def image_case_name(path: Path) -> str:
    """An image's case: case_name without nnU-Net's channel-0 suffix ('prostate_10_0000' ->
    'prostate_10'), so a mask written for it is named like its label."""
    name = case_name(path)
    return name[: -len(NNUNET_CHANNEL)] if name.endswith(NNUNET_CHANNEL) else name


def nifti_files(folder: Path) -> list[Path]:
    """The one NIfTI listing: .nii and .nii.gz files of a folder, sorted, hidden files (and so the
    temporary files of atomic_write) left out."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.name.endswith(NIFTI) and not p.name.startswith("."))


def atomic_write(path, write) -> None:
    """Every file this project writes (checkpoints, NIfTI, cache, CSV, JSON, PNG) goes through here:
    `write(tmp)` fills a temporary file beside `path`, which then replaces it in one os.replace, so
    a crash or a full disk never leaves half a file. The temporary name is hidden and ends like
    `path` (.nii.gz, .npz), so nibabel and numpy pick the right format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix="-" + path.name)
    os.close(fd)
    os.chmod(tmp, 0o644)                   # mkstemp makes 0600; results are shared like any file
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_command(main, interrupted: str) -> None:
    """Every command's entry point: main's exit code, and Ctrl-C as one line that says what was kept
    (never a traceback)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {interrupted}")


def atomic_write_text(path, text: str) -> None:
    """A text file (CSV, JSON, markdown) through atomic_write; newlines as given."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)
    atomic_write(path, write)


def read_dataset_json(root: Path) -> dict:
    """A data set's dataset.json (Decathlon, nnU-Net), or {} if there is none."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def channel_index(channel, names: dict, where) -> int | None:
    """--channel as an index: a number, or a name that dataset.json lists ('modality' in Decathlon
    and nnU-Net v1, 'channel_names' in v2). None: a name with no dataset.json to look it up in."""
    if str(channel).isdigit():
        return int(channel)
    match = [int(k) for k, v in names.items() if str(v).lower() == str(channel).lower()]
    if match:
        return match[0]
    if names:
        raise DataError(f"{where}: no channel named {channel!r}; dataset.json lists {names}")
    return None


def is_channel_layout(images: list[Path], label_dir: Path | None = None) -> bool:
    """nnU-Net's layout: every channel of case CASE is its own 3-D file CASE_XXXX (XXXX = channel).
    A folder is read so when every image name ends in four digits after an underscore and every
    case so formed has its channel 0 (CASE_0000); where labels exist, they must be named by those
    cases. Case ids that end in four digits themselves (pat_0001.nii.gz with label pat_0001.nii.gz,
    as in AMOS) are cases of their own, not channels."""
    stems = [case_name(p) for p in images]
    split = [re.fullmatch(r"(.+)_(\d{4})", s) for s in stems]
    if not stems or not all(split):
        return False
    cases = {m.group(1) for m in split}
    if any(f"{c}{NNUNET_CHANNEL}" not in stems for c in cases):
        return False
    if label_dir is not None and label_dir.is_dir():
        labels = {case_name(p) for p in nifti_files(label_dir)}
        if labels and not cases & labels or set(stems) & labels:
            return False
    return True


def image_cases(folder: Path, channel: int, label_dir: Path | None = None) -> list:
    """The one channel rule, for training and inference alike: [(case, image file, channel within
    that file)] of an image folder. nnU-Net's layout (is_channel_layout): the file CASE_XXXX whose
    XXXX is the channel, read as a 3-D volume. Any other layout: every file is a case, and a 4-D
    image's `channel` is taken from its last axis. PROMISE12's CASE_segmentation labels are left
    out."""
    files = [p for p in nifti_files(folder)
             if not p.name.split(".nii")[0].endswith(SEGMENTATION_SUFFIX)]
    if not is_channel_layout(files, label_dir):
        return [(case_name(p), p, channel) for p in files]
    wanted = f"_{channel:04d}"
    by_case = {}
    for p in files:
        by_case.setdefault(case_name(p)[:-5], {})[case_name(p)[-5:]] = p
    missing = sorted(c for c, ch in by_case.items() if wanted not in ch)
    if missing:
        raise DataError(f"{folder}: case {missing[0]} has no channel {channel} file "
                        f"({missing[0]}{wanted}.nii.gz); check --channel")
    return [(c, ch[wanted], 0) for c, ch in sorted(by_case.items())]


def find_cases(root, channel: int | str = 0, modality: str = "auto",
               require_labels: bool = True) -> list[Case]:
    """Cases of a Decathlon, nnU-Net or plain paired-folder data set, sorted by name.

    channel: index or name (as dataset.json lists it) of the channel to read (image_cases)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    names = (lambda m: m.get("modality") or m.get("channel_names") or {})(read_dataset_json(root))
    channel = channel_index(channel, names, root)
    if channel is None:
        raise DataError(f"{root}: no dataset.json names the channels; give --channel as an index")
    if modality == "auto" and names:
        first = str(names.get(str(channel), "")).lower()
        modality = "ct" if first == "ct" else ("mr" if first else "auto")
    if (root / "imagesTr").is_dir():
        img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
    elif (root / "images").is_dir():
        img_dir, lab_dir = root / "images", root / "labels"
    else:
        raise DataError(f"{root}: expected imagesTr/ + labelsTr/ (Decathlon, nnU-Net) or images/ + "
                        f"labels/")
    cases = []
    for name, img, ch in image_cases(img_dir, channel, lab_dir):
        labels = (lab_dir / f"{name}.nii.gz", lab_dir / f"{name}.nii")
        lab = next((p for p in labels if p.is_file()), None)
        if lab is None and require_labels:
            raise DataError(f"{img}: no label {lab_dir / (name + '.nii.gz')}")
        cases.append(Case(name, img, lab, ch, modality))
    if not cases:
        raise DataError(f"{img_dir}: no NIfTI images (.nii, .nii.gz)")
    return cases


def _read_nifti(path: Path):
    import nibabel as nib
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:   # nibabel and gzip raise many types for truncated or corrupted files
        raise DataError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from None
    return img, data


@dataclass
class Geometry:
    """What is needed to write a prediction back onto the input's own grid."""
    shape: tuple            # original array shape (3-D)
    affine: list            # original affine (4x4, as nested lists for JSON)
    ornt: list              # nibabel orientation of the original axes -> RAS
    spacing: tuple          # mm, along the RAS-ordered axes


def load_case(case: Case, need_label: bool = True):
    """(image float32, label uint8 or None, Geometry), arrays reoriented to RAS; raises DataError on
    bad input."""
    from nibabel import orientations as O
    img, data = _read_nifti(case.image)
    if data.ndim == 4:
        if not 0 <= case.channel < data.shape[3]:
            raise DataError(f"{case.image}: channel {case.channel} requested, image has "
                            f"{data.shape[3]}")
        data = data[..., case.channel]
    if data.ndim != 3:
        raise DataError(f"{case.image}: expected a 3-D volume (or 4-D with channels), got shape "
                        f"{data.shape}")
    data = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise DataError(f"{case.image}: image holds NaN or infinite voxels")
    # Geometry comes from the affine (what nibabel, nnU-Net and ITK use), not the header's pixdim,
    # which some converters leave stale: the voxel size along each array axis is the length of that
    # affine column.
    zooms = np.sqrt((np.asarray(img.affine, np.float64)[:3, :3] ** 2).sum(0))
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-9:
        raise DataError(f"{case.image}: singular affine (zero spacing?) or non-finite values; fix "
                        f"the file's sform/qform: {np.round(img.affine, 3).tolist()}")
    if zooms.max() > MAX_SLICE_MM:
        print(f"warning: {case.image}: voxels of {zooms.round(2).tolist()} mm; slices coarser than "
              f"{MAX_SLICE_MM:g} mm cannot resolve the prostate's ends (its volume may be off by "
              f"tens of per cent)",
              file=sys.stderr)
    if min(data.shape) < 2:
        raise DataError(f"{case.image}: volume too small, shape {data.shape}")
    ornt = O.io_orientation(img.affine)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = zooms
    geo = Geometry(tuple(int(s) for s in data.shape), img.affine.tolist(), ornt.tolist(),
                   tuple(spacing.tolist()))
    label = None
    if case.label is not None and need_label:
        limg, ldata = _read_nifti(case.label)
        ldata = np.asarray(ldata)
        if ldata.ndim == 4 and ldata.shape[3] == 1:
            ldata = ldata[..., 0]
        if ldata.shape != data.shape:
            raise DataError(f"{case.label}: label shape {ldata.shape} does not match image shape "
                            f"{data.shape}")
        differ = affine_mismatch(limg.affine, img.affine)
        if differ:
            raise DataError(f"{case.label}: label and image {differ}; resample the label onto "
                            f"{case.image.name}'s grid (or fix the header)")
        if not np.all(np.isfinite(ldata)):
            raise DataError(f"{case.label}: label holds NaN or infinite values")
        # every label value > 0 is prostate
        label = O.apply_orientation((ldata > 0).astype(np.uint8), ornt)
    return O.apply_orientation(data, ornt).astype(np.float32), label, geo


def affine_mismatch(a, b, tol_mm: float = 1e-3) -> str | None:
    """How two voxel grids differ, in one phrase for a one-line error (None if they agree within
    tol_mm): NaN in either affine, or the largest difference in mm (voxel size, origin) or degrees
    (axis direction)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return "an affine holds NaN or infinite values (a broken header: fix its sform/qform)"
    if np.allclose(a, b, atol=tol_mm):
        return None
    size_a, size_b = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    cos = np.sum(a[:3, :3] * b[:3, :3], 0) / np.maximum(size_a * size_b, 1e-12)
    degrees = float(np.degrees(np.arccos(np.clip(cos, -1, 1))).max())
    parts = [f"voxel size by {np.abs(size_a - size_b).max():.3g} mm",
             f"origin by {np.linalg.norm(a[:3, 3] - b[:3, 3]):.3g} mm",
             f"axis direction by {degrees:.3g} degrees"]
    return "grids differ: " + ", ".join(parts)


def detect_modality(image: np.ndarray) -> str:
    """CT if the image holds air in Hounsfield units (< -500), else MR."""
    return "ct" if float(image.min()) < -500 else "mr"


# ------------------------------------------------------------------------------------ preprocessing

def resample_to(volume: np.ndarray, spacing, new_spacing: float = SPACING_MM,
                order: int = 1) -> np.ndarray:
    """Section IV-B: trilinear resampling (order=1) onto a grid of `new_spacing` mm whose voxel 0 is
    the input's voxel 0; the physical extent (n-1)*spacing is kept, to within one output voxel."""
    spacing = np.asarray(spacing, float)
    out_shape = resample_shape(volume.shape, spacing, new_spacing)
    return ndimage.affine_transform(volume.astype(np.float32, copy=False), new_spacing / spacing,
                                    output_shape=out_shape, order=order, mode="nearest")


def resample_label(label: np.ndarray, spacing, new_spacing: float = SPACING_MM) -> np.ndarray:
    """Labels are resampled as a float occupancy with trilinear interpolation and thresholded at
    0.5, so the mask keeps its shape and volume (nearest neighbour would give staircase edges on
    thick slices). Only the label's bounding box (plus a voxel) is interpolated; the rest of the
    output is 0."""
    spacing = np.asarray(spacing, float)
    out = np.zeros(resample_shape(label.shape, spacing, new_spacing), np.uint8)
    idx = np.argwhere(label > 0)
    if len(idx) == 0:
        return out
    lo = np.maximum(idx.min(0) - 1, 0) * spacing / new_spacing
    hi = np.minimum(idx.max(0) + 1, np.array(label.shape) - 1) * spacing / new_spacing
    o_lo = np.ceil(lo - 1e-6).astype(int)
    o_hi = np.minimum(np.floor(hi + 1e-6).astype(int), np.array(out.shape) - 1)
    sub = ndimage.affine_transform(label.astype(np.float32), new_spacing / spacing,
                                   offset=o_lo * new_spacing / spacing,
                                   output_shape=tuple(o_hi - o_lo + 1), order=1, mode="nearest")
    out[tuple(slice(a, b + 1) for a, b in zip(o_lo, o_hi))] = sub >= 0.5
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a mask (the body for body_box; the prostate for
    infer.py's Stage-1 centre). An empty mask is returned as it is."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == sizes.argmax()


def pieces(mask: np.ndarray) -> int:
    """How many disconnected pieces a mask has: its 26-connected components (voxels that touch at a
    face, an edge or a corner are one piece), as a reader of the mask would count them."""
    return int(ndimage.label(mask, np.ones((3, 3, 3)))[1])


def largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected piece of a mask (as pieces() counts); fewer than two: as it is."""
    comp, n = ndimage.label(mask, np.ones((3, 3, 3)))
    if n < 2:
        return mask
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    return comp == sizes.argmax()


def central_piece(mask: np.ndarray, point) -> np.ndarray:
    """The piece (26-connected, as pieces() counts) of a mask nearest to a point in voxels: the one
    that holds it, or else the one whose nearest voxel is closest. A mask of fewer than two pieces
    is returned as it is."""
    comp, n = ndimage.label(mask, np.ones((3, 3, 3)))
    if n < 2:
        return mask
    distance = np.linalg.norm(np.argwhere(comp) - np.asarray(point, float), axis=1)
    nearest = np.full(n + 1, np.inf)
    np.minimum.at(nearest, comp[comp > 0], distance)           # both in C order: voxel by voxel
    return comp == nearest.argmin()


def body_box(image: np.ndarray, modality: str):
    """Section IV-B: "cropped by a simple threshold-based method": threshold, largest connected
    component, its bounding box. CT: HU > -500. MR (paper silent): > 10 % of the 99th percentile."""
    thr = CT_BODY_HU if modality == "ct" else 0.1 * float(np.percentile(image, 99))
    # the component search at 2 mm is plenty for a box
    small = image[::2, ::2, ::2] > thr
    body = largest_component(small)
    if not body.any():
        return tuple(slice(0, n) for n in image.shape)
    box = []
    for axis in range(3):
        idx = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(2 * idx[0] - 2, 0), min(2 * idx[-1] + 3, image.shape[axis])))
    return tuple(box)


def normalise(image: np.ndarray, modality: str,
              body_sample: np.ndarray | None = None) -> np.ndarray:
    """Section IV-B: intensities to [0, 255] (uint8). CT: the fixed HU window CT_WINDOW_HU. MR:
    percentiles."""
    if modality == "ct":
        lo, hi = CT_WINDOW_HU
    else:
        ref = body_sample if body_sample is not None and body_sample.size else image
        lo, hi = (float(v) for v in np.percentile(ref, MR_PERCENTILES))
        hi = hi if hi > lo else lo + 1.0
    return np.round(np.clip((image - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def femoral_head_centre(hu: np.ndarray):
    """Section III-A: "The reference prostate center is determined by the center of two femur
    heads."

    Paper is silent on how the heads are found. On the 1-mm CT in HU: bone = HU > 200; holes filled
    slice by slice (the trabecular core may fall below the threshold); connected components smaller
    than a 12-mm ball are dropped (calcifications, fragments). A femoral head is the thickest bone
    there is, so its centre is the deepest point of the bone mask (maximum of its Euclidean distance
    transform), one on each side of the body's mid-line (the middle of the body crop). Returns
    (centre (3,) in voxel coordinates or None, message)."""
    bone = hu > CT_BONE_HU
    if not bone.any():
        return None, "no bone above 200 HU (not a CT, or no femoral heads in the field of view)"
    bone = np.stack([ndimage.binary_fill_holes(bone[..., z]) for z in range(bone.shape[2])], axis=2)
    lab, n = ndimage.label(bone)
    sizes = np.bincount(lab.ravel())
    keep = sizes >= (4 / 3) * math.pi * 12 ** 3
    keep[0] = False
    bone = keep[lab]
    if not bone.any():
        return None, "no bone component as large as a femoral head"
    # deepest bone point: the distance transform at 2 mm finds it, then an exact 1-mm transform in a
    # box around it (larger than the head, so the nearest non-bone voxel is always inside the box)
    # refines it
    coarse = ndimage.distance_transform_edt(bone[::2, ::2, ::2], sampling=2.0)
    # hu is the body crop: its middle column is the mid-line
    mid = hu.shape[0] // 2
    centres = []
    for lo, hi in ((0, mid), (mid, hu.shape[0])):
        d = coarse[lo // 2:(hi + 1) // 2]
        if d.size == 0 or d.max() < 12:
            deepest = d.max() if d.size else 0
            return None, f"no femoral head on one side (deepest bone {deepest:.0f} mm < 12 mm)"
        c = np.array(np.unravel_index(int(d.argmax()), d.shape)) * 2
        c[0] += (lo // 2) * 2
        r = int(d.max()) + 8
        box = tuple(slice(max(int(v) - r, 0), min(int(v) + r + 1, n)) for v, n in zip(c, hu.shape))
        fine = ndimage.distance_transform_edt(np.pad(bone[box], 1))[1:-1, 1:-1, 1:-1]
        deepest = np.array(np.unravel_index(int(fine.argmax()), fine.shape), float)
        centres.append(deepest + [b.start for b in box])
    sep, dz = abs(centres[1][0] - centres[0][0]), abs(centres[1][2] - centres[0][2])
    if not (100 <= sep <= 280 and dz <= 30):
        return None, (f"implausible femoral heads (separation {sep:.0f} mm, height difference "
                      f"{dz:.0f} mm)")
    return (centres[0] + centres[1]) / 2, "midpoint of the two femoral heads"


@dataclass
class Prepared:
    """A preprocessed case: 1-mm, RAS, body-cropped uint8 image (and label), and how to map back."""
    name: str
    image: np.ndarray                 # uint8 (X, Y, Z), [0, 255]
    label: np.ndarray | None          # uint8 0/1 or None
    meta: dict = field(default_factory=dict)
    # meta: geometry (Geometry as dict), modality, box_start (crop offset in the 1-mm grid),
    # grid_shape (full 1-mm grid), reference_centre (femoral midpoint in crop voxels or None),
    # reference_note


def preprocess(case: Case, need_label: bool = True, log=None) -> Prepared:
    """Section IV-B preprocessing of one case (see the module docstring)."""
    image, label, geo = load_case(case, need_label)
    modality = case.modality if case.modality in ("ct", "mr") else detect_modality(image)
    hu = resample_to(image, geo.spacing)
    box = body_box(hu, modality)
    hu = hu[box]
    ref, note = (femoral_head_centre(hu) if modality == "ct"
                 else (None, "MR: no femoral-head reference, the Stage-1 estimate is used alone"))
    if log and ref is None and modality == "ct":
        log(f"  {case.name}: no femoral-head reference centre ({note})")
    sample = hu[::2, ::2, ::2]
    img8 = normalise(hu, modality,
                     sample[sample > np.percentile(sample, 10)] if modality == "mr" else None)
    lab8 = None
    if label is not None:
        lab8 = resample_label(label, geo.spacing)[box]
        if need_label and not lab8.any():
            raise DataError(f"{case.label}: label is empty (no voxel > 0 after resampling to 1 mm)")
    meta = dict(geometry=geo.__dict__, modality=modality, box_start=[int(s.start) for s in box],
                grid_shape=[int(n) for n in resample_shape(geo.shape, geo.spacing)],
                reference_centre=None if ref is None else [float(v) for v in ref],
                reference_note=note, source=str(case.image))
    return Prepared(case.name, img8, lab8, meta)


def resample_shape(shape, spacing, new_spacing: float = SPACING_MM):
    """Voxels per axis after resampling to new_spacing, keeping the first voxel centre and never
    reaching past the last one (so the 1-mm grid lies inside the input's field of view; 1e-6 absorbs
    float round-off)."""
    return tuple(int(math.floor((n - 1) * s / new_spacing + 1e-6)) + 1
                 for n, s in zip(shape, spacing))


def cache_path(case: Case, cache_dir, need_label: bool = True) -> Path:
    """Where a case's preprocessing is cached: keyed by the source files' paths, sizes and mtimes
    and by the settings, so an edited scan or a changed setting is preprocessed again."""
    recipe = [str(case.image.resolve()), _stamp(case.image), str(case.label), _stamp(case.label),
              case.channel, case.modality, need_label, CT_WINDOW_HU, MR_PERCENTILES, SPACING_MM, 2]
    key = hashlib.sha1(json.dumps(recipe).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{case.name}-{key}.npz"


def read_cached(path: Path, name: str) -> Prepared:
    """One cached case (written by prepare_cases)."""
    z = np.load(path, allow_pickle=False)
    lab = z["label"] if z["label"].size else None
    return Prepared(name, z["image"], lab, json.loads(str(z["meta"])))


def prepare_cases(cases: list[Case], cache_dir, need_label: bool = True,
                  log=print) -> list[Prepared]:
    """Preprocess every case once and cache it (uint8 .npz + JSON meta) under cache_dir; later calls
    read the cache. Each file is written atomically, so processes that share a cache never see half
    a file, even when two of them preprocess the same case."""
    out = []
    t0 = time.time()
    for i, case in enumerate(cases, 1):
        path = cache_path(case, cache_dir, need_label)
        if path.is_file():
            out.append(read_cached(path, case.name))
            continue
        p = preprocess(case, need_label, log)
        lab = p.label if p.label is not None else np.zeros(0, np.uint8)
        atomic_write(path, lambda tmp: np.savez(tmp, image=p.image, label=lab,
                                                meta=np.array(json.dumps(p.meta))))
        out.append(p)
        if log:
            log(f"  preprocessed {i}/{len(cases)} {case.name}: {p.image.shape} at 1 mm, "
                f"{p.meta['modality']}, {time.time() - t0:.0f} s")
    return out


class CachedCases:
    """{case name: Prepared} read from the cache when asked, not held: training keeps only what it
    derives (the 1/4-size images, the 128^3 crops), so a process's memory does not grow with the
    full-size volumes of every case (about 50 MB each for a pelvic CT at 1 mm)."""

    def __init__(self, cases: list[Case], cache_dir):
        self.paths = {c.name: cache_path(c, cache_dir) for c in cases}

    def __getitem__(self, name: str) -> Prepared:
        return read_cached(self.paths[name], name)


def _stamp(path):
    """(size, mtime) of a source file: part of the cache key, so an edited or replaced scan is
    preprocessed again."""
    if path is None:
        return None
    st = Path(path).stat()
    return [st.st_size, int(st.st_mtime)]


def split_cases(names: list[str], seed: int = 0, fractions=(0.7, 0.1, 0.2), fold: int | None = None,
                folds: int | None = None):
    """Section IV-A: random 70 / 10 / 20 split, deterministic in `seed` and independent of listing
    order. With 3 or more cases each part gets at least one case.

    With `folds` (cross-validation, for data sets too small for a 70/10/20 split such as the 5-case
    MRI subset): the shuffled cases are cut into `folds` near-equal parts, part `fold` is the test
    set, all others train, and there is no validation set (train.py then keeps the last epoch).
    folds = len(names) is leave-one-out. Paper is silent here: it only uses the 70/10/20 split."""
    names = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(names))
    order = [names[i] for i in perm]
    if folds is not None:
        if not 2 <= folds <= len(names) or fold is None or not 0 <= fold < folds:
            raise ValueError(f"need 2 <= folds <= {len(names)} cases and 0 <= fold < folds; got "
                             f"fold {fold} of {folds}")
        parts = np.array_split(np.arange(len(order)), folds)
        test = [order[i] for i in parts[fold]]
        return [n for n in order if n not in test], [], test
    n = len(names)
    n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
    n_test = max(1, round(fractions[2] * n)) if n >= 3 else 0
    n_train = n - n_val - n_test
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def list_and_split(root, channel, split="70/10/20", split_seed=0, fold=None, folds=None):
    """train.py's data: the cases of `root` and their split (Section IV-A's 70/10/20, a
    cross-validation fold, or split='all': every case trains, for the model a user deploys).
    Returns (cases, (train, val, test) names)."""
    cases = find_cases(root, channel)
    names = [c.name for c in cases]
    if split == "all":
        return cases, (sorted(names), [], [])
    return cases, split_cases(names, split_seed, fold=fold, folds=folds)


# ------------------------------------------------------------------------------------------ Stage 1

def stage1_volume(volume: np.ndarray, factor: int = STAGE1_FACTOR, order: int = 1,
                  antialias: bool = False) -> np.ndarray:
    """Section III-A: "we down-sample the images into 1/4 size of the original scale by trilinear
    interpolation": voxel j of the result sits at voxel factor*j of the input.

    Trilinear interpolation read at integer positions (4j) is plain decimation, v[::4, ::4, ::4]:
    three voxels in four are never looked at, and anything thinner than 4 mm (a prostate edge,
    noise) aliases. The paper is silent on anti-aliasing; antialias=True (`--stage1-antialias`, on
    in the small-data presets) first low-passes with a Gaussian of sigma = (factor - 1) / 2 voxels
    (scikit-image's rescale default, 1.5 mm here), which is what down-sampling by interpolation is
    meant to do; the output grid is unchanged (voxel j still sits at input voxel factor*j), so the
    Stage-1 centre maps back the same way."""
    v = volume.astype(np.float32)
    if antialias:
        v = ndimage.gaussian_filter(v, sigma=(factor - 1) / 2, mode="nearest")
    out_shape = tuple((n - 1) // factor + 1 for n in volume.shape)
    return ndimage.affine_transform(v, np.full(3, float(factor)), output_shape=out_shape,
                                    order=order, mode="nearest")


def stage1_pair(p: Prepared, antialias: bool = False):
    """(1/4-size image uint8, 1/4-size label uint8) of a preprocessed case. The label is
    down-sampled as an occupancy (with antialias: the share of prostate around each coarse voxel)
    and thresholded at 0.5."""
    img = np.round(stage1_volume(p.image, antialias=antialias)).astype(np.uint8)
    lab = None if p.label is None else (
        stage1_volume(p.label.astype(np.float32), antialias=antialias) >= 0.5).astype(np.uint8)
    return img, lab


# ------------------------------------------------------------------------------------------ Stage 2

def label_centre(label: np.ndarray) -> np.ndarray:
    """Centroid of the prostate voxels, in voxels of the 1-mm grid: the ground-truth centre of Stage
    2's training crops and the reference that Stage 1's centre error is measured against."""
    return np.argwhere(label > 0).mean(0)


def prostate_crop(p: Prepared, size: int = CROP_SIZE):
    """Stage 2's training pair (Section III-B): image and label cropped to size^3 around the
    ground-truth prostate centre (at test time the centre comes from Stage 1 and the femoral heads
    instead)."""
    c = label_centre(p.label)
    return crop_around(p.image, c, size)[0], crop_around(p.label, c, size)[0]


def crop_around(volume: np.ndarray, centre, size: int = CROP_SIZE, fill: int = 0):
    """Section III-A: a size^3 crop centred on `centre` (voxels), padded with `fill` where it runs
    past the volume (fill 0 = air after normalisation). Returns (crop, start) with start the crop's
    corner in `volume`'s voxels (may be negative)."""
    start = np.round(np.asarray(centre, float)).astype(int) - size // 2
    out = np.full((size,) * 3, fill, dtype=volume.dtype)
    src = tuple(slice(max(s, 0), min(s + size, n)) for s, n in zip(start, volume.shape))
    dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start))
    if all(a.stop > a.start for a in src):
        out[dst] = volume[src]
    return out, start


# ------------------------------------------------------------------------------------- augmentation
# Paper is silent on augmentation for MetricUNet itself, and its ablation trains without it on
# purpose (Section IV-D: "we avoid using many complicated techniques ... e.g., data augmentation"),
# so `--preset paper` and `--paper-strict` never augment. With a handful of scans it is what keeps a
# network from memorising them (`--augment spatial`, the small-data presets). Ranges are nnU-Net's,
# narrowed where 2.5D patches of a resampled, body-cropped CT need less: the patient lies on the
# table the same way up. The intensity part (`--augment all`) is for uncalibrated images (MRI): on
# CT, whose Hounsfield units are calibrated, a +-0.05 brightness shift is the whole prostate-muscle
# contrast (20 HU = 0.05 of the [0, 1] window), and on the phantom it cost validation DSC (0.33 vs
# 0.84 after 4 epochs, cpu preset).
AUGMENT = dict(
    # left-right mirror (RAS axis 0); the pelvis is near-symmetric, the label too
    flip=0.5,
    rotate_deg=15.0,              # in-plane rotation, uniform in +-15 degrees
    scale=(0.85, 1.15),           # in-plane zoom
    gamma=(0.8, 1.25),            # x -> x ** gamma on [0, 1], log-uniform
    contrast=(0.9, 1.1),          # x -> x * c + b
    brightness=(-0.05, 0.05),
    # additive Gaussian noise, sd uniform in this range (of the [0, 1] scale)
    noise_sd=(0.0, 0.03),
)


def draw_augmentation(rng: np.random.Generator) -> dict:
    """One patch's augmentation parameters, drawn from AUGMENT."""
    A = AUGMENT
    return dict(flip=bool(rng.random() < A["flip"]),
                angle=math.radians(rng.uniform(-A["rotate_deg"], A["rotate_deg"])),
                scale=rng.uniform(*A["scale"]), gamma=math.exp(rng.uniform(*np.log(A["gamma"]))),
                contrast=rng.uniform(*A["contrast"]), brightness=rng.uniform(*A["brightness"]),
                noise_sd=rng.uniform(*A["noise_sd"]), noise_seed=int(rng.integers(2 ** 31)))


def patch_coordinates(centre_xy, size: int, angle: float = 0.0, scale: float = 1.0,
                      flip: bool = False):
    """(2, size, size) input-plane coordinates read by each pixel of an output patch centred on
    centre_xy: output pixel u (relative to the patch centre) reads input point centre + R(angle) F u
    / scale, with F the left-right mirror if flip. scale > 1 zooms in (anatomy looks larger).
    Identity parameters give exactly the unrotated patch, x0 .. x0 + size - 1."""
    u = np.arange(size, dtype=np.float64) - (size - 1) / 2
    uu, vv = np.meshgrid(u, u, indexing="ij")
    if flip:
        uu = -uu
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([centre_xy[0] + (c * uu - s * vv) / scale,
                     centre_xy[1] + (s * uu + c * vv) / scale])


def augment_patch(img_slices: list, label_slice: np.ndarray, centre_xy, size: int, params: dict,
                  intensity: bool = True):
    """Spatial augmentation of one 2.5D patch, image and label through the same coordinates: each
    image slice bilinearly, the label as a bilinear occupancy thresholded at 0.5 (as labels are
    resampled elsewhere). Points outside the volume read 0 (air after normalisation, the crop's own
    padding). Then, if intensity, the intensity part on the image alone. img_slices: n (X, Y) uint8
    slices; returns ((size, size, n) float32 in [0, 1]-ish, (size, size) uint8)."""
    xy = patch_coordinates(centre_xy, size, params["angle"], params["scale"], params["flip"])
    read = lambda sl: ndimage.map_coordinates(sl, xy, output=np.float32, order=1, mode="constant",
                                              cval=0.0)
    x = np.stack([read(sl) for sl in img_slices], -1) / 255.0
    y = read(label_slice.astype(np.float32)) >= 0.5
    if not intensity:
        return x.astype(np.float32), y.astype(np.uint8)
    x = np.clip(x, 0, 1) ** params["gamma"] * params["contrast"] + params["brightness"]
    if params["noise_sd"] > 0:
        x = x + np.random.default_rng(params["noise_seed"]).normal(0, params["noise_sd"], x.shape)
    return x.astype(np.float32), y.astype(np.uint8)


class PatchDataset:
    """2.5D training patches (Section III-A for Stage 1, IV-B for Stage 2) from in-memory uint8
    volumes.

    Item i is patch (i mod patches_per_image) of volume v = i // patches_per_image: `n_slices`
    axial slices `steps[v]` apart (default 1, adjacent; native_slice_step) as channels (scaled to
    [0, 1]) and the label of the middle slice. Its position is drawn from a generator seeded by
    (seed, i), so the training set is a fixed set of patches per image, as in Section IV-B ("we
    cropped 500 patches from each training image"), the same in every DataLoader worker and after a
    resume; a DistributedSampler gives each rank different indices and so different patches.
    Slices past the volume repeat the edge slice; in-plane, volumes smaller than the patch are
    zero-padded.

    Paper is silent on where patches are drawn ("randomly cropped ... in a sliding-window fashion").
    A fraction `fg_fraction` of patches (default 1/3, nnU-Net's foreground oversampling) is centred
    on a random prostate voxel, the rest are uniform over the volume, because the prostate fills
    about 3 % of a 128^3 crop.

    augment ('off', 'spatial' or 'all'; paper is silent, see AUGMENT) transforms each patch on the
    fly, from its own few slices only (no full-volume work per step). An index past len(self) means
    epoch (i // len) of patch (i % len): the patch stays the same, its augmentation is drawn from
    (seed, patch, epoch), so every epoch sees a new, reproducible variant (EpochIndexSampler adds
    epoch * len to the indices)."""

    def __init__(self, images, labels, patch: int = 64, n_slices: int = 3,
                 patches_per_image: int = 500,
                 fg_fraction: float = 1 / 3, seed: int = 0, augment: str = "off",
                 steps=None):
        augment = {False: "off", True: "all"}.get(augment, augment)
        if augment not in ("off", "spatial", "all"):
            raise ValueError(f"augment must be 'off', 'spatial' or 'all', got {augment!r}")
        if len(images) != len(labels) or not images:
            raise ValueError("need as many labels as images, and at least one")
        self.images = [self._pad(np.asarray(v), patch) for v in images]
        self.labels = [self._pad(np.asarray(v), patch) for v in labels]
        self.fg = [np.argwhere(lab > 0) for lab in self.labels]
        self.patch, self.n_slices, self.per_image = patch, n_slices, patches_per_image
        self.fg_fraction, self.seed, self.augment = fg_fraction, seed, augment
        self.steps = list(steps) if steps is not None else [1] * len(images)   # slices_25d's step

    @staticmethod
    def _pad(v, patch):
        pad = [(0, max(0, patch - v.shape[0])), (0, max(0, patch - v.shape[1])), (0, 0)]
        return np.pad(v, pad) if any(p[1] for p in pad) else v

    def __len__(self):
        return len(self.images) * self.per_image

    def __getitem__(self, i):
        import torch
        epoch, i = divmod(int(i), len(self))
        v = i // self.per_image
        img, lab, fg = self.images[v], self.labels[v], self.fg[v]
        rng = np.random.default_rng((self.seed, i))
        P, half = self.patch, self.n_slices // 2
        centre = None
        if len(fg) and rng.random() < self.fg_fraction:
            centre = fg[rng.integers(len(fg))]
        if centre is not None:
            c = centre
            jitter = (-P // 4, P // 4 + 1)                     # the prostate voxel within +-16
            x0 = int(np.clip(c[0] - P // 2 + rng.integers(*jitter), 0, img.shape[0] - P))
            y0 = int(np.clip(c[1] - P // 2 + rng.integers(*jitter), 0, img.shape[1] - P))
            z = int(c[2])
        else:
            x0, y0 = rng.integers(0, img.shape[0] - P + 1), rng.integers(0, img.shape[1] - P + 1)
            z = int(rng.integers(0, img.shape[2]))
        zs = np.clip(z + self.steps[v] * np.arange(-half, half + 1), 0, img.shape[2] - 1)
        if self.augment != "off":
            params = draw_augmentation(np.random.default_rng((self.seed, i, epoch, 1)))
            x, y = augment_patch([img[:, :, k] for k in zs], lab[:, :, z],
                                 (x0 + (P - 1) / 2, y0 + (P - 1) / 2),
                                 P, params, intensity=self.augment == "all")
            return (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
                    torch.from_numpy(y.astype(np.int64)))
        x = img[x0:x0 + P, y0:y0 + P][:, :, zs]                      # (P, P, n_slices)
        y = lab[x0:x0 + P, y0:y0 + P, z]
        return (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).float().div_(255.0),
                torch.from_numpy(np.ascontiguousarray(y)).long())


class EpochIndexSampler:
    """Wraps a DistributedSampler: yields its indices plus epoch * len(dataset), which PatchDataset
    reads as the same patch with that epoch's augmentation. The epoch travels inside the index, so
    persistent DataLoader workers (each holds its own copy of the dataset) need no shared state, and
    a resumed run draws exactly what the uninterrupted run would have drawn. (A DataLoader accepts
    any iterable with a length as its sampler, so this needs no torch import.)"""

    def __init__(self, sampler, n: int):
        self.sampler, self.n = sampler, n

    def __iter__(self):
        return (self.sampler.epoch * self.n + i for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


def slices_25d(volume: np.ndarray, n_slices: int, multiple: int = 8, step: int = 1):
    """Every axial slice of a whole volume with its neighbours as channels, for inference without
    patch voting (Section IV-B): (Z, n_slices, X', Y') float32 in [0, 1], X and Y zero-padded to a
    multiple of 8. The neighbours lie `step` slices apart (native_slice_step), the edge slice
    repeated past the volume, as in PatchDataset."""
    half = n_slices // 2
    X, Y, Z = volume.shape
    Xp, Yp = -(-X // multiple) * multiple, -(-Y // multiple) * multiple
    v = np.zeros((Xp, Yp, Z), np.float32)
    v[:X, :Y] = volume
    # (Z, n_slices)
    idx = np.clip(np.arange(Z)[:, None] + step * np.arange(-half, half + 1)[None], 0, Z - 1)
    return v[:, :, idx].transpose(2, 3, 0, 1) / 255.0


def native_slice_step(p: Prepared, native: bool) -> int:
    """How many 1-mm slices apart Stage 2's three input slices lie (train.py --native-slices).
    Section III-B takes adjacent slices of the 1-mm volume: 1. Paper is silent on scans whose own
    slices are thicker (its CT has 1-3 mm slices; MRI has 3-4 mm): resampled to 1 mm, three adjacent
    slices of such a scan are nearly one interpolated image, 2 mm of through-plane context. With
    native=True the neighbours lie one of the scan's own slices apart (its slice spacing rounded to
    whole mm), so the network sees the slices above and below."""
    return max(1, int(round(p.meta["geometry"]["spacing"][2] / SPACING_MM))) if native else 1


def to_original_grid(prob_1mm: np.ndarray, meta: dict, threshold: float | None = 0.5) -> np.ndarray:
    """Inverse of preprocess: a probability map on the body-cropped 1-mm RAS grid -> the input's own
    grid (shape and axis order), by trilinear interpolation of the probability; then a uint8 mask (>
    threshold), or the float32 probability itself when threshold is None."""
    from nibabel import orientations as O
    geo = meta["geometry"]
    grid = np.zeros(meta["grid_shape"], np.float32)
    b = meta["box_start"]
    grid[tuple(slice(s, s + n) for s, n in zip(b, prob_1mm.shape))] = prob_1mm
    spacing = np.asarray(geo["spacing"], float)
    ornt = np.asarray(geo["ornt"])
    ras_shape = np.empty(3, int)
    ras_shape[ornt[:, 0].astype(int)] = geo["shape"]
    # voxel i of the RAS-ordered original grid sits at i * spacing mm on the 1-mm grid
    prob = ndimage.affine_transform(grid, spacing / SPACING_MM, output_shape=tuple(ras_shape),
                                    order=1, mode="constant", cval=0.0)
    out = prob.astype(np.float32) if threshold is None else (prob > threshold).astype(np.uint8)
    back = O.ornt_transform(O.axcodes2ornt(("R", "A", "S")), ornt)     # RAS -> original axes
    return np.ascontiguousarray(O.apply_orientation(out, back))


def main(argv=None):
    """`python data.py DATA_DIR`: what train.py would see: the cases, the split, and every case
    preprocessed into the cache (a one-line error for bad input, exit code 2)."""
    p = argparse.ArgumentParser(description="List a data set's cases and split; preprocess and "
                                            "cache them.")
    p.add_argument("data_dir", help="Decathlon, nnU-Net or images/ + labels/ data set folder")
    p.add_argument("--channel", default="0",
                   help="channel of 4-D images, by index or name (e.g. T2)")
    p.add_argument("--cache", default="data_cache", help="preprocessed-volume cache folder")
    p.add_argument("--split-seed", type=int, default=0, help="the 70/10/20 split (as train.py)")
    args = p.parse_args(argv)
    root, cache = Path(args.data_dir).resolve(), Path(args.cache).resolve()
    if root == cache or root in cache.parents:
        print(f"error: --cache {args.cache} lies inside the data set {args.data_dir}, where "
              f"nothing is written; choose a cache folder outside it", file=sys.stderr)
        return 2
    try:
        cases = find_cases(args.data_dir, args.channel)
        tr, va, te = split_cases([c.name for c in cases], args.split_seed)
        print(f"{len(cases)} cases; split train {len(tr)} / val {len(va)} / test {len(te)}")
        for prep in prepare_cases(cases, args.cache):
            print(f"  {prep.name}: 1-mm body crop {prep.image.shape}, prostate "
                  f"{prep.label.sum() / 1000:.0f} ml, reference: {prep.meta['reference_note']}")
    except (ValueError, OSError) as e:                  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_command(main, "the cases cached so far are complete; the same command continues")
