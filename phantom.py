"""A synthetic pelvic CT with known ground truth: the default data set, so that everything runs
anywhere.

    python phantom.py OUT_DIR [--cases N] [--seed S]   # a Decathlon-layout data set in a new folder

Paper is silent (it trains on 339 private CTs, Section IV-A). The phantom has what the pipeline
needs to be exercised end to end: CT values in Hounsfield units, per-case spacing and orientation,
femoral heads for Section III-A's reference centre, and a prostate whose contrast with the muscle
around it is a few tens of HU, with rectal stool in the same range behind it. It is not anatomy: it
checks the code, not the method. train.py generates it when no --data is given. """
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

import data


def _ellipsoid(grid_mm, centre, radii, rot=None):
    """Boolean ellipsoid on a grid given as three broadcastable coordinate arrays in mm."""
    x, y, z = (g - c for g, c in zip(grid_mm, centre))
    if rot is not None:
        x, y = x * rot[0] + y * rot[1], -x * rot[1] + y * rot[0]
    return (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2 <= 1.0


def make_phantom_case(seed: int, spacing=None):
    """One synthetic pelvic CT in HU (int16) with its prostate mask, on a RAS-ordered grid.

    Anatomy, in mm from the pelvis centre (x right, y anterior, z superior): an elliptical body of
    subcutaneous fat around muscle; a fatty pelvic cavity; two femoral heads (cortical shell
    900-1200 HU, trabecular core 200-350 HU) with their necks; the pubic bones in front of the
    prostate; a bladder of variable filling above it; a rectum with gas and stool behind it; and the
    prostate (20-80 ml, lobulated ellipsoid, 25-40 HU) inside a sling of muscle (45-60 HU): a
    contrast of a few tens of HU. Blurred by an in-plane PSF and the slice profile, then Gaussian
    noise of sigma 10-25 HU. Returns (hu int16, label uint8, spacing (3,), truth dict).

    The hard part is deliberate: the rectal stool behind the prostate covers the prostate's HU
    range, so only context tells them apart, as the low soft-tissue contrast of CT does in the
    paper's Fig. 2. Everything is drawn from `seed`, so a data set is reproduced exactly from its
    seed."""
    rng = np.random.default_rng(seed)
    s_xy = rng.uniform(0.93, 1.37) if spacing is None else spacing[0]
    s_z = rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0]) if spacing is None else spacing[2]
    ax, ay = rng.uniform(135, 155), rng.uniform(90, 110)            # body half-axes
    nx, ny = int((2 * ax + 40) / s_xy), int((2 * ay + 40) / s_xy)
    nz = int(rng.uniform(110, 130) / s_z)
    # body not always centred in the FOV
    y_off = rng.uniform(-8, 8)
    x = ((np.arange(nx) - (nx - 1) / 2) * s_xy)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * s_xy + y_off)[None, :, None]
    z = ((np.arange(nz) - (nz - 1) / 2) * s_z)[None, None, :]
    g = (x, y, z)

    def to_vox(p):                                                  # mm -> voxel coordinates
        return [p[0] / s_xy + (nx - 1) / 2, (p[1] - y_off) / s_xy + (ny - 1) / 2,
                p[2] / s_z + (nz - 1) / 2]

    hu = np.full((nx, ny, nz), -1000.0, np.float32)
    # body: fat, then muscle, then the fatty pelvic cavity
    taper = 1 + 0.08 * z / 60
    fat = rng.uniform(12, 30)
    hu[np.broadcast_to((x / (ax * taper)) ** 2 + (y / ay) ** 2 <= 1,
                       hu.shape)] = -100 + rng.normal(0, 5)
    hu[np.broadcast_to((x / (ax * taper - fat)) ** 2 + (y / (ay - fat)) ** 2 <= 1, hu.shape)] = 50
    hu[np.broadcast_to((x / 62) ** 2 + ((y - 5) / 48) ** 2 <= 1, hu.shape)] = -85
    # femoral heads and necks
    xf, yf, zf, rf = rng.uniform(78, 88), rng.uniform(-5,
                                                      10), rng.uniform(-5, 15), rng.uniform(20, 24)
    heads = []
    for sgn in (-1, 1):
        c = np.array([sgn * xf, yf, zf]) + rng.normal(0, 1.0, 3)
        heads.append(c)
        # neck: chain of balls, lateral-inferior
        for t in np.linspace(0, 1, 12):
            cc = c + t * np.array([sgn * 28, -5, -38])
            hu[_ellipsoid(g, cc, (12, 12, 12))] = 700
        hu[_ellipsoid(g, c, (rf, rf, rf))] = rng.uniform(900, 1200)
        hu[_ellipsoid(g, c, (rf - 2.5,) * 3)] = rng.uniform(200, 350)
    mid = (heads[0] + heads[1]) / 2
    # prostate: below the femoral-head level, lobulated ellipsoid of 20-80 ml
    vol_ml = rng.uniform(20, 80)
    shape = rng.uniform(0.8, 1.25, 3)
    r = (vol_ml * 1000 * 3 / (4 * math.pi) / np.prod(shape)) ** (1 / 3) * shape
    pc = mid + np.array([rng.normal(0, 3), rng.uniform(-8, 6), -rng.uniform(12, 28)])
    ang = rng.uniform(-0.3, 0.3)
    rot = (math.cos(ang), math.sin(ang))
    # muscle sling (levator ani) and obturator muscles around the prostate, then the pubic bones in
    # front
    hu[_ellipsoid(g, pc + [0, -4, -3], r * [1.45, 1.4, 1.25], rot)] = rng.uniform(45, 60)
    for sgn in (-1, 1):
        hu[_ellipsoid(g, pc + [sgn * (r[0] + 14), 0, 0], (10, 30, 28))] = rng.uniform(45, 60)
        hu[_ellipsoid(g, pc + [sgn * 22, r[1] + 20, 2], (20, 6, 12))] = 800   # pubic rami
    hu[_ellipsoid(g, pc + [0, r[1] + 22, 2], (8, 9, 16))] = 600              # symphysis
    # ischial bones, behind-lateral
    for sgn in (-1, 1):
        hu[_ellipsoid(g, pc + [sgn * 52, -r[1] - 12, -8], (11, 16, 30))] = 750
    # lobulated prostate: radius modulated by smooth random bumps
    px, py, pz = (gi - ci for gi, ci in zip(g, pc))
    px, py = px * rot[0] + py * rot[1], -px * rot[1] + py * rot[0]
    rho = np.sqrt((px / r[0]) ** 2 + (py / r[1]) ** 2 + (pz / r[2]) ** 2)
    theta = np.arctan2(py, px)
    bump = (1 + 0.06 * np.sin(2 * theta + rng.uniform(0, 6))
            + 0.05 * np.cos(3 * theta + rng.uniform(0, 6)) + 0.05 * pz / r[2] * np.sign(py))
    prostate = np.broadcast_to(rho <= bump, hu.shape)
    hu[prostate] = rng.uniform(25, 40)
    # bladder above, with a muscular wall; filling varies
    br = np.array([rng.uniform(28, 55), rng.uniform(22, 42), rng.uniform(18, 38)])
    bc = pc + np.array([0, rng.uniform(0, 10), r[2] + br[2] * 0.85])
    hu[_ellipsoid(g, bc, br + 3) & ~prostate] = 45
    hu[_ellipsoid(g, bc, br) & ~prostate] = rng.uniform(0, 15)
    # rectum behind, along z with a slight curve; wall, stool and gas
    rr = rng.uniform(13, 19)
    ry = pc[1] - r[1] - rr - rng.uniform(2, 6)
    curve = ry + 0.004 * (z - pc[2]) ** 2
    tube = (x - pc[0]) ** 2 + (y - curve) ** 2
    hu[np.broadcast_to(tube <= rr ** 2, hu.shape) & ~prostate] = 40
    lumen = np.broadcast_to(tube <= (rr - 3) ** 2, hu.shape)
    stool = ndimage.gaussian_filter(rng.normal(0, 1, hu.shape).astype(np.float32), 2.0)
    hu[lumen] = np.where(stool[lumen] > 0.12, -900, 20 + 400 * stool[lumen])
    # sacrum / coccyx behind the rectum
    hu[_ellipsoid(g, [pc[0], ry - rr - 14, pc[2] + 35], (22, 10, 35))] = 650
    # slice profile (Gaussian, FWHM = one slice) and in-plane PSF, then noise
    hu = ndimage.gaussian_filter(hu, (0.7 / s_xy, 0.7 / s_xy, 0.45))
    hu += rng.normal(0, rng.uniform(10, 25), hu.shape).astype(np.float32)
    label = np.asarray(prostate, np.uint8)
    truth = dict(femoral_head_centres_vox=[to_vox(h) for h in heads],
                 femoral_midpoint_vox=to_vox(mid),
                 prostate_centre_vox=to_vox(pc),
                 prostate_volume_ml=float(label.sum() * s_xy * s_xy * s_z / 1000))
    return np.clip(np.round(hu), -1024,
                   3071).astype(np.int16), label, np.array([s_xy, s_xy, s_z]), truth


# The data set is written in the Medical Segmentation Decathlon's layout (dataset.json, imagesTr/,
# labelsTr/), so every reader of real data in data.py is exercised by the default run too.
def make_phantom(out_dir, cases: int = 20, seed: int = 0, log=print) -> Path:
    """Write a Decathlon-layout phantom data set (dataset.json, imagesTr, labelsTr) into a new
    folder.

    Each case has its own spacing (in-plane 0.93-1.37 mm, slices 1-3 mm, as in Section IV-A) and
    affine; odd cases are stored LPS (x and y flipped, as DICOM converters write CT) to exercise
    reorientation."""
    import nibabel as nib
    out = Path(out_dir)
    if cases < 1:
        raise ValueError(f"--cases must be at least 1, got {cases}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; the phantom is written to a new folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; the phantom is only written to a "
                              f"new folder")
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    training, truth = [], {}
    t0 = time.time()
    for i in range(cases):
        hu, lab, sp, tr = make_phantom_case(seed * 100003 + i)
        name = f"phantom_{i:03d}"
        aff = np.diag([sp[0], sp[1], sp[2], 1.0])
        aff[:3, 3] = np.random.default_rng(seed * 7 + i).uniform(-200, 200, 3)
        if i % 2:                                                     # store as LPS
            hu, lab = hu[::-1, ::-1], lab[::-1, ::-1]
            aff = aff @ np.array([[-1, 0, 0, hu.shape[0] - 1], [0, -1, 0, hu.shape[1] - 1],
                                  [0, 0, 1, 0], [0, 0, 0, 1]], float)
            n = hu.shape
            for key in ("femoral_head_centres_vox",):
                tr[key] = [[n[0] - 1 - c[0], n[1] - 1 - c[1], c[2]] for c in tr[key]]
            for key in ("femoral_midpoint_vox", "prostate_centre_vox"):
                c = tr[key]
                tr[key] = [n[0] - 1 - c[0], n[1] - 1 - c[1], c[2]]
        tr["femoral_midpoint_world"] = (aff @ np.r_[tr["femoral_midpoint_vox"], 1])[:3].tolist()
        img = nib.Nifti1Image(np.ascontiguousarray(hu), aff)
        img.header.set_xyzt_units("mm")
        data.atomic_write(out / "imagesTr" / f"{name}.nii.gz", lambda tmp: nib.save(img, str(tmp)))
        seg = nib.Nifti1Image(np.ascontiguousarray(lab), aff)
        data.atomic_write(out / "labelsTr" / f"{name}.nii.gz", lambda tmp: nib.save(seg, str(tmp)))
        training.append({"image": f"./imagesTr/{name}.nii.gz",
                         "label": f"./labelsTr/{name}.nii.gz"})
        truth[name] = tr
        if log:
            log(f"  phantom {i + 1}/{cases}: {name} {hu.shape} at {sp.round(2).tolist()} mm, "
                f"prostate {tr['prostate_volume_ml']:.0f} ml ({time.time() - t0:.0f} s)")
    meta = {"name": "MetricUNet synthetic pelvic CT phantom",
            "description": f"phantom.py, seed {seed}",
            "modality": {"0": "CT"}, "labels": {"0": "background", "1": "prostate"},
            "numTraining": cases, "training": training, "phantom_truth": truth}
    data.atomic_write_text(out / "dataset.json", json.dumps(meta, indent=1))
    return out


def main(argv=None):
    """The command line; a one-line error (exit code 2) for a bad folder or case count."""
    p = argparse.ArgumentParser(description="Write a synthetic pelvic-CT data set (Decathlon "
                                            "layout).")
    p.add_argument("out_dir", help="a new (or empty) folder")
    p.add_argument("--cases", type=int, default=20, help="number of CTs")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same data set")
    args = p.parse_args(argv)
    try:
        make_phantom(args.out_dir, args.cases, args.seed)
    except (ValueError, OSError) as e:                  # FileExistsError is an OSError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    data.run_command(main, "delete the partial phantom folder and run again")
