"""metrics.py against analytic shapes, a brute-force all-pairs reference and hand-worked cases."""
import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

import metrics


# ------------------------------------------------------------------ independent reference

def brute_surface(mask):
    """Surface by explicit 6-neighbour look-up with a False pad (no scipy morphology)."""
    p = np.pad(mask, 1, constant_values=False)
    inner = p[1:-1, 1:-1, 1:-1]
    all_in = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            all_in &= np.roll(p, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return inner & ~all_in


def brute_distances(a, b, spacing):
    pa = np.argwhere(brute_surface(a)) * spacing
    pb = np.argwhere(brute_surface(b)) * spacing
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))   # all pairs
    return d.min(1), d.min(0)


def random_shape(rng, shape):
    m = rng.random(shape) < 0.15
    for _ in range(2):
        m = np.pad(m, 1)[2:, 1:-1, 1:-1] | m | np.pad(m, 1)[1:-1, 2:, 1:-1]  # grow into small blobs
    return m


@pytest.mark.parametrize("seed", range(6))
def test_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(6, 14, 3))
    a, b = random_shape(rng, shape), random_shape(rng, shape)
    spacing = rng.uniform(0.4, 3.0, 3)
    got = metrics.evaluate(a, b, spacing)
    d1, d2 = brute_distances(a, b, spacing)
    assert got["ASD"] == pytest.approx(0.5 * (d1.mean() + d2.mean()), rel=1e-9)
    assert got["HD"] == pytest.approx(max(d1.max(), d2.max()), rel=1e-9)
    assert got["HD95"] == pytest.approx(max(np.percentile(d1, 95), np.percentile(d2, 95)), rel=1e-9)
    pooled = np.percentile(np.r_[d1, d2], 95)
    assert metrics.hd95(a, b, spacing, "pooled") == pytest.approx(pooled, rel=1e-9)
    tp = (a & b).sum()
    assert got["DSC"] == pytest.approx(2 * tp / (a.sum() + b.sum()))
    assert got["PPV"] == pytest.approx(tp / a.sum()) and got["SEN"] == pytest.approx(tp / b.sum())
    assert got["aRVD"] == pytest.approx(abs(a.sum() - b.sum()) / b.sum() * 100)


def test_shifted_cubes_anisotropic():
    a = np.zeros((30, 30, 30), bool)
    b = np.zeros_like(a)
    a[10:20, 10:20, 10:20] = True
    b[10:20, 10:20, 12:22] = True  # shifted 2 voxels along axis 2, spacing 2.5 mm
    r = metrics.evaluate(a, b, (0.8, 0.8, 2.5))
    assert r["DSC"] == pytest.approx(0.8)
    assert r["HD"] == pytest.approx(5.0)
    assert r["PPV"] == pytest.approx(0.8) and r["SEN"] == pytest.approx(0.8) and r["aRVD"] == 0


def test_concentric_spheres():
    z, y, x = np.mgrid[:48, :48, :48] - 23.5
    rr = np.sqrt(x * x + y * y + z * z)
    r = metrics.evaluate(rr <= 10, rr <= 16, (1, 1, 1))
    assert r["HD"] == pytest.approx(6, abs=1.0)
    assert r["ASD"] == pytest.approx(6, abs=0.8)
    assert r["DSC"] == pytest.approx(2 * 10 ** 3 / (10 ** 3 + 16 ** 3), abs=0.02)


def test_offset_spheres_hd():
    z, y, x = np.mgrid[:40, :40, :60]
    a = (x - 20) ** 2 + (y - 20) ** 2 + (z - 20) ** 2 <= 81
    b = (x - 26) ** 2 + (y - 20) ** 2 + (z - 20) ** 2 <= 81
    # the two poles, exactly 6 apart
    assert metrics.evaluate(a, b)["HD"] == pytest.approx(6, abs=1e-9)


def test_symmetry_and_ppv_sen_swap():
    rng = np.random.default_rng(9)
    a, b = random_shape(rng, (12, 12, 12)), random_shape(rng, (12, 12, 12))
    r1, r2 = metrics.evaluate(a, b, (1, 2, 3)), metrics.evaluate(b, a, (1, 2, 3))
    for m in ("DSC", "ASD", "HD", "HD95"):
        assert r1[m] == pytest.approx(r2[m])
    assert r1["PPV"] == pytest.approx(r2["SEN"]) and r1["SEN"] == pytest.approx(r2["PPV"])


def test_masks_touching_the_border_and_crop_is_exact():
    a = np.zeros((20, 20, 20), bool)
    b = np.zeros_like(a)
    a[0:6, 0:5, 14:20] = True
    b[0:4, 0:7, 15:20] = True
    sp = np.array([1.3, 0.7, 2.0])
    d1, d2 = brute_distances(a, b, sp)
    c1, c2 = metrics.directed_surface_distances(a, b, sp, crop=True)
    w1, w2 = metrics.directed_surface_distances(a, b, sp, crop=False)
    assert np.array_equal(c1, w1) and np.array_equal(c2, w2)
    assert np.allclose(np.sort(c1), np.sort(d1)) and np.allclose(np.sort(c2), np.sort(d2))


def test_single_voxels():
    a = np.zeros((8, 8, 8), bool)
    b = np.zeros_like(a)
    a[2, 2, 2] = b[2, 2, 3] = True                     # one voxel apart along axis 2 (3 mm)
    r = metrics.evaluate(a, b, (1, 2, 3))
    assert r["DSC"] == 0 and r["ASD"] == r["HD"] == r["HD95"] == pytest.approx(3.0)


def test_empty_masks_are_defined_and_never_flattering():
    e = np.zeros((10, 10, 10), bool)
    f = e.copy()
    f[3:6, 3:6, 3:6] = True
    both = metrics.evaluate(e, e, (1, 1, 1))
    assert both["DSC"] == 1 and both["ASD"] == 0 and both["HD95"] == 0
    missed = metrics.evaluate(e, f, (1, 1, 2))
    diag = math.sqrt(10 ** 2 + 10 ** 2 + 20 ** 2)
    assert missed["DSC"] == 0 and missed["SEN"] == 0 and missed["ASD"] == pytest.approx(diag)
    assert missed["aRVD"] == 100
    good = {"case": "a", **metrics.evaluate(f, f, (1, 1, 2)), "empty_prediction": False}
    s = metrics.summarize([good, {"case": "b", **missed, "empty_prediction": True}])
    assert s["DSC"]["mean"] == 0.5 and s["empty_predictions"] == 1
    assert s["ASD"]["mean"] == pytest.approx(diag / 2)


def test_bad_arguments():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        metrics.evaluate(a, np.zeros((4, 4, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="3-D"):
        metrics.evaluate(a[0], a[0], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        metrics.evaluate(a, a, (1, 0, 1))


# ------------------------------------------------------------------ command line

def save(path, arr, affine):
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), affine), str(path))


def make_case_dirs(tmp_path, n=4):
    rng = np.random.default_rng(0)
    aff = np.diag([0.9, 0.9, 2.5, 1.0])
    gt, p1, p2 = (tmp_path / d for d in ("gt", "p1", "p2"))
    for d in (gt / "labelsTr", p1, p2):
        d.mkdir(parents=True)
    for i in range(n):
        g = np.zeros((24, 24, 12), bool)
        g[6:18, 6:18, 3:9] = True
        save(gt / "labelsTr" / f"prostate_{i}.nii.gz", g, aff)
        save(p1 / f"prostate_{i}.nii.gz", np.roll(g, rng.integers(0, 3), 0), aff)
        save(p2 / f"prostate_{i}.nii.gz", np.roll(g, rng.integers(1, 5), 1), aff)
    return gt, p1, p2, aff


def test_cli_writes_csv_summary_and_pvalues(tmp_path, capsys):
    gt, p1, p2, _ = make_case_dirs(tmp_path)
    out = tmp_path / "report" / "cases.csv"
    assert metrics.main([str(p1), str(gt), "--csv", str(out), "--compare", str(p2)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["case"] for r in rows] == [f"prostate_{i}" for i in range(4)]
    assert (tmp_path / "report" / "cases.summary.json").exists()
    r1 = metrics.evaluate_folders(p1, gt, log=lambda *_: None)
    r2 = metrics.evaluate_folders(p2, gt, log=lambda *_: None)
    d = np.array([a["DSC"] - b["DSC"] for a, b in zip(r1, r2)])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))        # paired t by hand
    p = 2 * stats.t.sf(abs(t), len(d) - 1)
    assert metrics.paired_pvalues(r1, r2)["DSC"] == pytest.approx(p)
    assert "p-values" in capsys.readouterr().out


def test_cli_clear_errors(tmp_path, capsys):
    gt, p1, _, aff = make_case_dirs(tmp_path, n=2)
    save(p1 / "prostate_1.nii.gz", np.zeros((24, 24, 12)), np.diag([1, 1, 1, 1.0]))
    assert metrics.main([str(p1), str(gt)]) == 2
    err = capsys.readouterr().err
    assert "prostate_1" in err and err.count("\n") == 1                  # one line, no matrices
    assert "grids differ: voxel size by 1.5 mm, origin by 0 mm, axis direction by 0 degrees" in err
    (p1 / "prostate_1.nii.gz").unlink()
    assert metrics.main([str(p1), str(gt)]) == 2
    assert "no prediction for case(s) prostate_1" in capsys.readouterr().err
    (p1 / "prostate_1.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    assert metrics.main([str(p1), str(gt)]) == 2
    assert "cannot read NIfTI" in capsys.readouterr().err


def test_predicted_only_scores_the_cases_that_have_a_prediction(tmp_path, capsys):
    # a test split's masks against the whole labelsTr: 2 of 3 cases predicted, one of them exactly
    gt, p1, _, aff = make_case_dirs(tmp_path, n=3)
    g = np.zeros((24, 24, 12), bool)
    g[6:18, 6:18, 3:9] = True
    save(p1 / "prostate_0.nii.gz", g, aff)                              # DSC 1
    save(p1 / "prostate_1.nii.gz", np.zeros_like(g), aff)               # empty: DSC 0
    (p1 / "prostate_2.nii.gz").unlink()
    assert metrics.main([str(p1), str(gt)]) == 2                        # by default: an error
    assert "--predicted-only" in capsys.readouterr().err
    out = tmp_path / "r.csv"
    assert metrics.main([str(p1), str(gt), "--predicted-only", "--csv", str(out)]) == 0
    assert "1 ground truths without a prediction left out" in capsys.readouterr().out
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["prostate_0", "prostate_1"]
    assert [float(r["DSC"]) for r in rows] == [1.0, 0.0]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["cases"] == 2 and summary["ground_truths_left_out"] == 1


# ------------------------------------------------------------------ the union-box crop is exact

def _placed(rng, shape, touch_border):
    """A random blob mask somewhere in `shape`; touch_border pushes it against a random face of the
    volume."""
    m = np.zeros(shape, bool)
    size = [int(rng.integers(2, max(3, n // 2 + 1))) for n in shape]
    lo = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size)]
    if touch_border:
        axis = int(rng.integers(3))
        lo[axis] = 0 if rng.random() < 0.5 else shape[axis] - size[axis]
    blob = random_shape(rng, tuple(size))
    m[tuple(slice(a, a + s) for a, s in zip(lo, size))] = blob
    return m


@pytest.mark.parametrize("seed", range(12))
def test_union_box_crop_identical_to_whole_volume(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (int(rng.integers(8, 40)), int(rng.integers(8, 40)), int(rng.integers(3, 24)))
    spacing = rng.uniform(0.4, 3.0, 3)
    pred = _placed(rng, shape, touch_border=seed % 2 == 0)
    gt = _placed(rng, shape, touch_border=seed % 3 == 0)
    if seed == 10:
        pred[:] = False                                  # empty prediction
    if seed == 11:
        pred[:], gt[:] = False, False                    # both empty
    fast = metrics.evaluate(pred, gt, spacing)
    whole = metrics.evaluate(pred, gt, spacing, crop=False)
    # counts by hand over the whole volume: the overlap metrics must be bit-identical
    tp, n_seg, n_gt = int((pred & gt).sum()), int(pred.sum()), int(gt.sum())
    if n_seg + n_gt:
        assert fast["DSC"] == 2 * tp / (n_seg + n_gt)
    for m in metrics.METRICS:
        if m in ("ASD", "HD95", "HD"):
            assert abs(fast[m] - whole[m]) <= 1e-9, (m, fast[m], whole[m])
        else:
            assert fast[m] == whole[m], (m, fast[m], whole[m])


def test_bounding_box_against_argwhere():
    rng = np.random.default_rng(7)
    for _ in range(5):
        m = _placed(rng, (20, 17, 9), touch_border=True)
        idx = np.argwhere(m)
        want = np.stack([idx.min(0), idx.max(0) + 1], 1)
        assert np.array_equal(metrics.bounding_box(m), want)
    assert metrics.bounding_box(np.zeros((4, 4, 4), bool)) is None


def test_non_bool_inputs_use_greater_than_zero():
    gt = np.zeros((10, 10, 10), np.float32)
    gt[2:5, 2:5, 2:5] = 1
    pred = -np.ones_like(gt)  # negative values are background, not "nonzero"
    pred[2:5, 2:5, 2:6] = 2
    r = metrics.evaluate(pred, gt)
    assert r["DSC"] == 2 * 27 / (27 + 36) and r["SEN"] == 1.0
