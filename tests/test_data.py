"""data.py: geometry against analytic expectations, the phantom's known truth, the real Decathlon
subset, and every kind of bad input."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import data
from phantom import make_phantom

MSD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "msd-prostate-subset"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph") / "phantom"
    make_phantom(root, cases=2, seed=3, log=None)
    return root


def test_resampling_keeps_extent_and_centroid():
    spacing = np.array([0.8, 1.3, 2.7])
    shape = (60, 40, 20)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) * spacing
    centre = np.array([21.0, 27.5, 24.0])                                   # mm
    lab = (np.linalg.norm((idx - centre) / [9, 7, 10], axis=-1) <= 1).astype(np.uint8)
    out = data.resample_label(lab, spacing)
    for n, s, m in zip(shape, spacing, out.shape):  # extent within one voxel
        assert abs((m - 1) - (n - 1) * s) < 1.0
    assert np.allclose(np.argwhere(out).mean(0), centre, atol=1.0)           # centroid within 1 mm
    vol_true = 4 / 3 * np.pi * 9 * 7 * 10
    assert abs(out.sum() - vol_true) / vol_true < 0.05
    ramp = np.broadcast_to(np.arange(shape[0])[:, None, None] * spacing[0],
                           shape).astype(np.float32)
    r = data.resample_to(ramp, spacing)  # trilinear is exact on a ramp
    assert np.allclose(r[:, 0, 0], np.arange(r.shape[0]), atol=1e-4)


def test_patch_middle_slice_lines_up_with_label():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (70, 66, 9)).astype(np.uint8)
    lab = (img > 200).astype(np.uint8)  # label is a function of the voxel
    ds = data.PatchDataset([img], [lab], patch=64, n_slices=5, patches_per_image=40, seed=1)
    for i in range(40):
        x, y = ds[i]
        assert x.shape == (5, 64, 64) and y.shape == (64, 64)
        assert np.array_equal((x[2].numpy() * 255).round() > 200, y.numpy() > 0)
    again = data.PatchDataset([img], [lab], patch=64, n_slices=5, patches_per_image=40, seed=1)
    assert all(np.array_equal(ds[i][0], again[i][0]) for i in range(5))        # index -> same patch
    other = data.PatchDataset([img], [lab], patch=64, n_slices=5, patches_per_image=40, seed=2)
    assert not all(np.array_equal(ds[i][0], other[i][0]) for i in range(5))


def test_slices_25d_neighbours_and_padding():
    v = np.arange(4 * 6 * 5, dtype=np.uint8).reshape(4, 6, 5)
    s = data.slices_25d(v, 3)
    assert s.shape == (5, 3, 8, 8)
    assert np.allclose(s[0, 0, :4, :6] * 255, v[:, :, 0])
    assert np.allclose(s[0, 2, :4, :6] * 255, v[:, :, 1])
    assert np.allclose(s[4, 2, :4, :6] * 255, v[:, :, 4]) and s[2, 1, 4:].sum() == 0


def test_crop_near_border_is_padded():
    v = np.arange(20 * 20 * 20).reshape(20, 20, 20)
    crop, start = data.crop_around(v, (2, 10, 18), size=8, fill=-1)
    assert list(start) == [-2, 6, 14]
    assert (crop[:2] == -1).all() and (crop[:, :, 6:] == -1).all()
    assert crop[2, 0, 0] == v[0, 6, 14] and crop[5, 3, 5] == v[3, 9, 19]


def test_phantom_femoral_centre_and_roundtrip(phantom, tmp_path):
    meta = json.loads((phantom / "dataset.json").read_text())
    cases = data.find_cases(phantom)
    preps = data.prepare_cases(cases, tmp_path / "cache", log=None)
    for c, p in zip(cases, preps):
        assert p.meta["modality"] == "ct" and p.image.dtype == np.uint8
        world = np.array(meta["phantom_truth"][c.name]["femoral_midpoint_world"])
        aff = nib.load(str(c.image)).affine
        vox = np.linalg.solve(aff, np.r_[world, 1])[:3]  # original voxel coordinates
        ornt = np.array(p.meta["geometry"]["ornt"])
        shape = p.meta["geometry"]["shape"]
        ras = np.empty(3)
        for i, (axis, flip) in enumerate(ornt):
            ras[int(axis)] = vox[i] if flip > 0 else shape[i] - 1 - vox[i]
        truth_mm = ras * np.array(p.meta["geometry"]["spacing"]) - p.meta["box_start"]
        assert np.linalg.norm(np.array(p.meta["reference_centre"]) - truth_mm) < 3.0
        # the label mapped back onto the original grid matches the original label
        back = data.to_original_grid(p.label.astype(np.float32), p.meta)
        orig = np.asarray(nib.load(str(c.label)).dataobj) > 0
        assert back.shape == orig.shape
        assert 2 * (back & orig).sum() / (back.sum() + orig.sum()) > 0.93
    # the second call reads the cache (no resampling): same arrays
    again = data.prepare_cases(cases, tmp_path / "cache", log=None)
    assert np.array_equal(again[0].image, preps[0].image)


def test_phantom_refuses_non_empty_folder(phantom):
    with pytest.raises(FileExistsError):
        make_phantom(phantom, cases=1)


@pytest.mark.skipif(not MSD.is_dir(), reason="shared Decathlon subset not present")
def test_decathlon_subset_loads_as_it_is(tmp_path):
    cases = data.find_cases(MSD, channel="T2")
    assert [c.name for c in cases] == ["prostate_10", "prostate_18", "prostate_28", "prostate_29",
                                       "prostate_34"]
    assert cases[0].modality == "mr"
    assert data.find_cases(MSD, channel="ADC")[0].channel == 1
    p = data.prepare_cases(cases[:1], tmp_path, log=None)[0]
    img = nib.load(str(cases[0].image))
    assert p.meta["reference_centre"] is None and "MR" in p.meta["reference_note"]
    zooms = img.header.get_zooms()[:3]
    assert np.allclose(sorted(p.meta["geometry"]["spacing"]), sorted(zooms), atol=1e-4)
    assert p.label.sum() > 1000 and p.image.max() == 255
    tr, va, te = data.split_cases([c.name for c in cases], seed=0)
    assert (len(tr), len(va), len(te)) == (3, 1, 1)
    assert sorted(tr + va + te) == [c.name for c in cases]


def test_split_is_deterministic_and_70_10_20():
    names = [f"c{i:02d}" for i in range(20)]
    a = data.split_cases(names, seed=4)
    assert a == data.split_cases(list(reversed(names)), seed=4)
    assert [len(x) for x in a] == [14, 2, 4] and a != data.split_cases(names, seed=5)


def test_cross_validation_tests_every_case_exactly_once():
    names = [f"c{i}" for i in range(7)]
    splits = [data.split_cases(names, seed=3, fold=f, folds=3) for f in range(3)]
    assert sorted(n for _, _, te in splits for n in te) == names          # a partition of the cases
    for tr, va, te in splits:
        assert va == [] and sorted(tr + te) == names and len(te) in (2, 3) and not set(tr) & set(te)
    # leave-one-out
    assert all(len(data.split_cases(names, 0, fold=f, folds=7)[2]) == 1 for f in range(7))
    for fold, folds in ((3, 3), (0, 8), (0, 1)):
        with pytest.raises(ValueError, match="folds"):
            data.split_cases(names, 0, fold=fold, folds=folds)


# ---------------------------------------------------------------- bad input

def write_case(root, name, img, lab, aff=None, lab_aff=None):
    aff = np.diag([1.0, 1.0, 2.0, 1.0]) if aff is None else aff
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(img, aff), str(root / "imagesTr" / f"{name}.nii.gz"))
    if lab is not None:
        nib.save(nib.Nifti1Image(lab, aff if lab_aff is None else lab_aff),
                 str(root / "labelsTr" / f"{name}.nii.gz"))


def good_arrays():
    img = np.full((20, 20, 10), -1000, np.int16)
    img[2:18, 2:18] = 40
    lab = np.zeros((20, 20, 10), np.uint8)
    lab[8:12, 8:12, 4:6] = 1
    return img, lab


@pytest.mark.parametrize("kind,match", [
    ("label_shape", "does not match image shape"),
    ("label_affine",
     r"label and image grids differ: voxel size by 1 mm, origin by 0 mm, axis direction by 0 "),
    ("nan", "NaN or infinite"),
    ("empty_label", "label is empty"),
    ("zero_spacing", "spacing must be positive|singular affine"),
    ("two_d", "expected a 3-D volume"),
    ("corrupt", "cannot read NIfTI"),
    ("missing_label", "no label"),
])
def test_bad_input_gives_clear_error_naming_the_file(tmp_path, kind, match):
    img, lab = good_arrays()
    root = tmp_path / kind
    if kind == "label_shape":
        write_case(root, "c", img, lab[:, :, :9])
    elif kind == "label_affine":
        write_case(root, "c", img, lab, lab_aff=np.diag([1.0, 1.0, 3.0, 1.0]))
    elif kind == "nan":
        write_case(root, "c", np.where(img > 0, np.nan, img).astype(np.float32), lab)
    elif kind == "empty_label":
        write_case(root, "c", img, lab * 0)
    elif kind == "zero_spacing":  # nibabel will not write it: patch pixdim[2] in the header
        write_case(root, "c", img, lab)
        for sub in ("imagesTr", "labelsTr"):
            gz = root / sub / "c.nii.gz"
            raw = bytearray(nib.load(str(gz)).to_bytes())
            raw[80:84] = np.float32(0.0).tobytes()   # pixdim[1] (x spacing) at byte 76 + 4
            raw[280:296] = np.zeros(4, np.float32).tobytes()  # srow_x: the sform's x column is 0
            # qform_code 0, sform_code 2: sform rules
            raw[252:256] = np.array([0, 2], np.int16).tobytes()
            gz.unlink()
            (root / sub / "c.nii").write_bytes(bytes(raw))
    elif kind == "two_d":
        write_case(root, "c", img[:, :, 0], lab[:, :, 0])
    elif kind == "corrupt":
        write_case(root, "c", img, lab)
        p = root / "imagesTr" / "c.nii.gz"
        p.write_bytes(p.read_bytes()[:200])
    elif kind == "missing_label":
        write_case(root, "c", img, None)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(data.DataError, match=match) as e:
        data.prepare_cases(data.find_cases(root), tmp_path / "cache", log=None)
    assert "c.nii" in str(e.value)
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}  # input untouched


def test_missing_folder_and_file():
    with pytest.raises(data.DataError, match="not found"):
        data.find_cases("/nonexistent/data")
    with pytest.raises(data.DataError, match="file not found"):
        data.load_case(data.Case("x", Path("/nonexistent/x.nii.gz"), None))


def test_nnunet_and_paired_folder_layouts(tmp_path):
    img, lab = good_arrays()
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    nn = tmp_path / "nnunet"
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir()
    for name in ("case_a", "case_b"):
        nib.save(nib.Nifti1Image(img, aff), str(nn / "imagesTr" / f"{name}_0000.nii.gz"))
        # a second channel
        nib.save(nib.Nifti1Image(img, aff), str(nn / "imagesTr" / f"{name}_0001.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(nn / "labelsTr" / f"{name}.nii.gz"))
    cases = data.find_cases(nn)
    assert [c.name for c in cases] == ["case_a", "case_b"]
    assert all(c.image.name.endswith("_0000.nii.gz") for c in cases)
    plain = tmp_path / "plain"
    (plain / "images").mkdir(parents=True)
    (plain / "labels").mkdir()
    nib.save(nib.Nifti1Image(img, aff), str(plain / "images" / "p1.nii"))
    nib.save(nib.Nifti1Image(lab, aff), str(plain / "labels" / "p1.nii.gz"))
    (c,) = data.find_cases(plain)
    image, label, geo = data.load_case(c)
    assert c.name == "p1" and image.shape == (20, 20, 10) and label.sum() == 32
    assert geo.spacing == (1.0, 1.0, 2.0)
