"""The additions for small data where the paper is silent, against independent computation: the
anti-aliased 1/4 down-sampling (constant, checkerboard, grid alignment), patch augmentation that
keeps image and label aligned (an analytically transformed ellipse), and --paper-strict giving
exactly Eq. 3 / Eq. 4 with no augmentation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import metricunet as M
import train


# ------------------------------------------------------- anti-aliased down-sampling (Section III-A)

def test_antialias_keeps_a_constant():
    v = np.full((37, 29, 21), 117.0, np.float32)
    out = data.stage1_volume(v, antialias=True)
    assert out.shape == (10, 8, 6)                                   # (n - 1) // 4 + 1 per axis
    assert np.allclose(out, 117.0, atol=1e-3)


def test_antialias_averages_a_checkerboard_that_decimation_aliases():
    idx = np.indices((48, 48, 48)).sum(0)
    board = (idx % 2).astype(np.float32)  # the highest frequency the grid holds
    plain = data.stage1_volume(board)  # trilinear at 4j = v[::4, ::4, ::4]
    assert np.array_equal(plain, board[::4, ::4, ::4])  # decimation: all 0 here, the mean is 0.5
    assert plain.max() == 0.0
    smooth = data.stage1_volume(board, antialias=True)
    # a Gaussian of sigma 1.5 leaves exp(-2 pi^2 sigma^2 f^2) = 1.5e-5 of a frequency-1/2 wave per
    # axis
    interior = smooth[2:-2, 2:-2, 2:-2]
    assert np.allclose(interior, 0.5, atol=1e-3)


def test_antialias_keeps_the_grid_alignment():
    """Coarse voxel j sits at input voxel 4j with and without anti-aliasing: a ball's centroid maps
    back."""
    g = np.indices((81, 73, 65)).astype(np.float32)
    centre = np.array([41.3, 30.7, 35.2])
    ball = (((g - centre[:, None, None, None]) ** 2).sum(0) <= 12 ** 2).astype(np.float32)
    for aa in (False, True):
        coarse = data.stage1_volume(ball, antialias=aa)
        w = coarse / coarse.sum()
        c = np.array([(np.indices(coarse.shape)[a] * w).sum() for a in range(3)]) * 4
        assert np.abs(c - centre).max() < 0.6, (aa, c)


# ------------------------------------------------------------------ patch augmentation

def ellipse(shape, centre, radii, angle=0.0):
    """Boolean ellipse on a (X, Y) grid, rotated by angle (radians) about its centre."""
    x, y = np.indices(shape, dtype=np.float64)
    x, y = x - centre[0], y - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 <= 1


def test_identity_parameters_give_the_plain_patch():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 80), dtype=np.uint8)
    lab = (rng.random((90, 80)) < 0.3).astype(np.uint8)
    ident = dict(angle=0.0, scale=1.0, flip=False, gamma=1.0, contrast=1.0, brightness=0.0,
                 noise_sd=0.0, noise_seed=0)
    x, y = data.augment_patch([img], lab, (10 + 31.5, 7 + 31.5), 64, ident)
    assert np.allclose(x[..., 0], img[10:74, 7:71] / 255.0, atol=1e-6)
    assert np.array_equal(y, lab[10:74, 7:71])


@pytest.mark.parametrize("angle_deg,scale,flip", [(12.0, 1.1, True), (-14.0, 0.87, False),
                                                  (0.0, 1.0, True)])
def test_augmentation_keeps_image_and_label_aligned(angle_deg, scale, flip):
    """An ellipse (image = 200 inside, 20 outside; label = inside) through a known rotation, zoom
    and mirror: the transformed label is the ellipse transformed by hand, and the transformed image
    is bright exactly there."""
    shape, centre, radii, tilt = (120, 110), (63.0, 52.0), (22.0, 11.0), 0.3
    lab = ellipse(shape, centre, radii, tilt).astype(np.uint8)
    img = np.where(lab > 0, 200, 20).astype(np.uint8)
    patch_centre = (60.5, 55.5)  # x0 + 31.5, as PatchDataset makes them
    params = dict(angle=math.radians(angle_deg), scale=scale, flip=flip, gamma=1.0, contrast=1.0,
                  brightness=0.0, noise_sd=0.0, noise_seed=0)
    x, y = data.augment_patch([img, img, img], lab, patch_centre, 64, params)
    # by hand: output pixel u (from the patch centre) reads input c + R(a) F u / s, so the ellipse
    # seen in the output is centred at F R(-a) s (centre - c), with axes scaled by s and tilt
    # mirrored/rotated accordingly
    a = math.radians(angle_deg)
    d = np.array(centre) - np.array(patch_centre)
    ca, sa = math.cos(a), math.sin(a)
    q = np.array([ca * d[0] + sa * d[1], -sa * d[0] + ca * d[1]]) * scale
    t = tilt - a
    if flip:
        q[0], t = -q[0], math.pi - t
    want = ellipse((64, 64), q + 31.5, np.array(radii) * scale, t)
    mismatch = (y.astype(bool) != want).sum()
    assert mismatch <= 0.06 * want.sum(), (mismatch, want.sum())     # boundary pixels only
    bright = x[..., 1] >= (109.9 / 255)  # 110 = occupancy 0.5, the label threshold
    assert (bright == y.astype(bool)).mean() > 0.99                    # image and label agree


def test_augmented_patches_vary_by_epoch_and_are_reproducible():
    rng = np.random.default_rng(1)
    vols = [rng.integers(0, 255, (80, 80, 12), dtype=np.uint8)]
    labs = [np.zeros((80, 80, 12), np.uint8)]
    labs[0][30:50, 30:50, 3:9] = 1
    ds = data.PatchDataset(vols, labs, patch=64, n_slices=3, patches_per_image=10, seed=4,
                           augment=True)
    a0, b0 = ds[3], ds[3]
    a1 = ds[3 + len(ds)]                                               # same patch, next epoch
    assert torch.equal(a0[0], b0[0]) and torch.equal(a0[1], b0[1])    # seeded
    assert not torch.equal(a0[0], a1[0])                               # a new variant every epoch
    plain = data.PatchDataset(vols, labs, patch=64, n_slices=3, patches_per_image=10, seed=4)
    # without augmentation: the fixed patch set
    assert torch.equal(plain[3][0], plain[3 + len(plain)][0])


# ------------------------------------------------------------------ --paper-strict

def test_paper_strict_turns_every_addition_off():
    for preset in train.PRESETS:
        a = train.parse_args(["--preset", preset, "--paper-strict"])
        assert (a.stage1_antialias, a.stage1_loss, a.augment,
                a.hard_negatives) == (False, "ce", "off", False)
    a = train.parse_args(["--preset", "paper"])
    assert (a.stage1_antialias, a.stage1_loss, a.augment,
            a.hard_negatives) == (False, "ce", "off", False)
    a = train.parse_args(["--preset", "cpu"])
    assert (a.stage1_antialias, a.stage1_loss, a.augment) == (True, "dice_ce", "spatial")
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "cpu", "--paper-strict", "--augment", "spatial"])


def test_paper_strict_losses_are_exactly_eq3_and_eq4():
    a = train.parse_args(["--preset", "cpu", "--paper-strict"])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 16, 16, generator=g)
    feats = torch.randn(4, 8, 16, 16, generator=g)
    labels = torch.zeros(4, 16, 16, dtype=torch.long)
    labels[:, 4:10, 5:12] = 1
    hp = train.metric_settings(a)
    assert hp == M.PAPER_DEFAULTS  # Eq. 1-4 at the paper's values
    loss1, _ = train.step_loss(logits, feats, labels, M.get_config("UNet"), hp, g,
                               dice=a.stage1_loss == "dice_ce")
    assert loss1.item() == F.cross_entropy(logits, labels).item()      # Eq. 3, nothing added
    cfg = M.get_config("R")
    loss2, _ = train.step_loss(logits, feats, labels, cfg, hp, torch.Generator().manual_seed(5))
    t = M.random_sampler(labels, 20, 1, torch.Generator().manual_seed(5))
    # Eq. 4, R row
    want = F.cross_entropy(logits, labels) + 0.01 * M.metric_loss(feats, t, 0.7, 0.0, 0.01)
    assert loss2.item() == pytest.approx(want.item(), rel=1e-6)
    small = train.parse_args(["--preset", "cpu"])  # the small-data preset adds soft Dice
    loss_dice, _ = train.step_loss(logits, feats, labels, M.get_config("UNet"),
                                   train.metric_settings(small), g,
                                   dice=small.stage1_loss == "dice_ce")
    p = torch.softmax(logits, 1)[:, 1]
    dice = 1 - (2 * (p * labels).sum() + 1e-5) / (p.sum() + labels.sum() + 1e-5)
    assert loss_dice.item() == pytest.approx((F.cross_entropy(logits, labels) + dice).item(),
                                             rel=1e-6)


# --------------------------------------------- --hard-negatives (Section III-B-2 ii, other reading)

def test_hard_negatives_are_the_networks_false_positives():
    lab = torch.zeros(3, 16, 16, dtype=torch.long)
    lab[:, 4:10, 4:10] = 1
    probs = torch.where(lab > 0, 0.95, 0.02)                       # a good prediction ...
    probs[0, 12:14, 12:15] = 0.8                                   # ... image 0: 6 false positives
    probs[0, 5, 5] = 0.3                                           # and one missed prostate voxel
    probs[1, 0, 0:2] = 0.6  # image 1: 2 false positives, nothing missed
    # image 2: no mistake at all
    a, p, n, v = M.focal_hard_negative_sampler(lab, probs, k=60, m=2, tau=0.1,
                                               generator=torch.Generator().manual_seed(0),
                                               hard_negatives=True)
    y = (lab > 0).flatten(1).numpy()
    # Eq. 1 on background voxels, by hand
    fp = ((probs.flatten(1) > 0.1) & (lab.flatten(1) == 0)).numpy()
    assert bool(v.all())
    assert set(a[0].tolist()) == {5 * 16 + 5}  # the one missed voxel is the anchor
    for i in (0, 1):
        assert fp[i, n[i].numpy()].all()                           # negatives: false positives only
    # nothing missed: any prostate voxel
    assert y[1, a[1].numpy()].all() and len(set(a[1].tolist())) > 10
    # no FP: all background
    assert (~y[2, n[2].numpy()]).all() and len(set(n[2].flatten().tolist())) > 30
    # the printed reading: image 1 and 2 have no hard positive, so no tuple; negatives from all
    # background
    a0, _, n0, v0 = M.focal_hard_negative_sampler(lab, probs, k=60, m=2, tau=0.1,
                                                  generator=torch.Generator().manual_seed(0))
    assert v0[:, 0].tolist() == [True, False, False] and not fp[0, n0[0].numpy()].all()


# ----------------------------------------------------- --native-slices (Section III-B's 2.5D input)

def test_native_neighbours_are_the_scans_own_slices():
    """A scan with 3-mm slices whose slice k holds the value 10 k + 5: resampled to 1 mm, 1-mm slice
    3 k is its slice k, and with --native-slices the three input channels there are slices k - 1,
    k, k + 1 of the scan (values read off the construction, not the code); adjacent 1-mm slices are
    interpolations between two scan slices."""
    scan = np.broadcast_to((10 * np.arange(7) + 5).astype(np.float32), (6, 5, 7)).copy()
    vol = data.resample_to(scan, (1.0, 1.0, 3.0))
    assert vol.shape[2] == 19                                     # (7 - 1) * 3 + 1 slices
    prep = data.Prepared("c", vol.astype(np.uint8), None,
                         {"geometry": {"spacing": (1.0, 1.0, 3.0)}})
    step = data.native_slice_step(prep, True)
    assert step == 3 and data.native_slice_step(prep, False) == 1
    x = data.slices_25d(prep.image, 3, step=step)                  # (Z, 3, X', Y') in [0, 1]
    k = 3
    assert np.allclose(x[3 * k, :, 0, 0] * 255, [25, 35, 45])      # scan slices 2, 3, 4
    x1 = data.slices_25d(prep.image, 3)                            # 1 mm: 2/3 and 1/3 mixes
    assert np.allclose(x1[3 * k, :, 0, 0] * 255, [25 + 20 / 3, 35, 45 - 20 / 3], atol=1)
    # past the volume the edge slice repeats, as for adjacent slices
    assert np.allclose(x[1, :, 0, 0] * 255, [5, 5 + 10 / 3, 5 + 40 / 3], atol=1)


def test_native_slice_step_rounds_the_scans_slice_spacing():
    for spacing, want in ((0.8, 1), (1.0, 1), (1.4, 1), (2.5, 2), (3.6, 4), (4.0, 4)):
        prep = data.Prepared("c", np.zeros((2, 2, 2), np.uint8), None,
                             {"geometry": {"spacing": (0.7, 0.7, spacing)}})
        assert data.native_slice_step(prep, True) == want


def test_training_patches_take_the_same_neighbours_as_inference():
    vol = np.zeros((64, 64, 30), np.uint8)
    vol[:] = np.arange(30, dtype=np.uint8) * 8                     # slice z holds 8 z
    lab = np.zeros_like(vol)
    ds = data.PatchDataset([vol], [lab], patch=64, n_slices=3, patches_per_image=20, fg_fraction=0,
                           steps=[4])
    for i in range(20):
        x, _ = ds[i]
        mid = round(float(x[1, 0, 0]) * 255 / 8)
        want = [min(max(mid + d, 0), 29) * 8 / 255 for d in (-4, 0, 4)]
        assert np.allclose(x[:, 0, 0].numpy(), want, atol=1e-6)


# ------------------------------------------------- --stage2-loss, and what --paper-strict turns off

def test_stage2_dice_is_a_flag_off_in_the_paper():
    paper = train.parse_args(["--preset", "paper"])
    assert (paper.native_slices, paper.stage2_loss, paper.postprocess) == (False, "ce", "off")
    assert not train.adds_dice(2, paper) and not train.adds_dice(1, paper)
    a = train.parse_args(["--preset", "cpu", "--stage2-loss", "dice_ce"])
    assert train.adds_dice(2, a) and train.adds_dice(1, a)
    b = train.parse_args(["--preset", "cpu"])
    assert train.adds_dice(1, b) and not train.adds_dice(2, b)
    for preset in train.PRESETS:
        s = train.parse_args(["--preset", preset, "--paper-strict"])
        assert (s.native_slices, s.stage2_loss, s.postprocess) == (False, "ce", "off")
    for flag in (["--native-slices"], ["--stage2-loss", "dice_ce"], ["--postprocess", "decide"]):
        with pytest.raises(SystemExit):
            train.parse_args(["--paper-strict", *flag])


# -------------------------------------------------------------- post-processing decided on evidence

def two_piece_case():
    """A gland (a 10x10x10 cube) and a stray 2x2x2 piece far from it; and a gland made of two
    separate cubes that both count."""
    gland = np.zeros((40, 40, 40), bool)
    gland[5:15, 5:15, 5:15] = True
    stray = np.zeros_like(gland)
    stray[30:32, 30:32, 30:32] = True
    return gland, stray


def test_pieces_count_26_connected_components():
    m = np.zeros((6, 6, 6), bool)
    m[0, 0, 0] = m[1, 1, 1] = True                     # touch at a corner: one piece
    m[4, 4, 4] = True
    assert data.pieces(m) == 2 and data.pieces(np.zeros_like(m)) == 0
    from metrics import count_pieces
    assert count_pieces(m) == 2 and count_pieces(np.zeros_like(m)) == 0


def test_central_piece_is_the_one_at_the_point():
    gland, stray = two_piece_case()
    big = np.zeros_like(gland)
    big[25:40, 25:40, 25:40] = True                                  # larger than the gland
    both = gland | big
    assert np.array_equal(data.central_piece(both, (10, 10, 10)), gland)     # holds the point
    assert np.array_equal(data.central_piece(both, (0, 0, 0)), gland)        # nearest: 5 sqrt 3
    assert np.array_equal(data.central_piece(both, (39, 39, 0)), big)        # nearest: 25 vs 36
    assert data.central_piece(gland, (30, 30, 30)) is gland                  # one piece: as it is
    assert np.array_equal(data.largest_piece(both), big) and data.largest_piece(gland) is gland


def test_keep_one_piece_removes_the_other_pieces_and_says_so():
    import infer
    gland, stray = two_piece_case()
    prob = np.where(gland | stray, 0.9, 0.1).astype(np.float32)
    said = []
    out = infer.keep_one_piece(prob, (9.5, 9.5, 9.5), said.append, "c")
    assert np.array_equal(out > 0.5, gland)
    assert np.array_equal(out[~stray], prob[~stray])               # nothing else touched
    # 1000 of 1008 voxels
    assert said == ["  c: kept the piece at the prostate centre, 1 of 2 pieces: 99 % of the mask"]
    one = np.where(gland, 0.9, 0.1).astype(np.float32)
    said.clear()
    assert infer.keep_one_piece(one, (0, 0, 0), said.append) is one and said == []


def test_decision_keeps_one_piece_only_where_it_helps():
    gland, stray = two_piece_case()
    dice = lambda a, b: 2 * (a & b).sum() / (a.sum() + b.sum())
    # must apply: a stray piece away from a one-piece gland
    pred = gland | stray
    kept = data.central_piece(pred, (10, 10, 10))
    ev = [dict(dsc_raw=dice(pred, gland), dsc_one_piece=dice(kept, gland))]
    assert ev[0]["dsc_raw"] == pytest.approx(2000 / 2008) and ev[0]["dsc_one_piece"] == 1.0
    assert train.one_piece_decision(ev)
    # must not apply: the gland itself is two pieces (the one kept loses the other)
    two = gland.copy()
    two[20:26, 20:26, 20:26] = True
    kept = data.central_piece(two, (10, 10, 10))
    ev = [dict(dsc_raw=dice(two, two), dsc_one_piece=dice(kept, two))]
    assert ev[0]["dsc_one_piece"] == pytest.approx(2000 / 2216)
    assert not train.one_piece_decision(ev)
    # pooled over cases: the mean decides (nnU-Net's rule), and no evidence decides nothing
    assert train.one_piece_decision([dict(dsc_raw=0.8, dsc_one_piece=0.9),
                                     dict(dsc_raw=0.9, dsc_one_piece=0.85)])
    assert not train.one_piece_decision([])


def test_postprocess_from_pools_fold_runs_and_refuses_a_run_without_evidence(tmp_path, capsys):
    import infer, json
    for i, (raw, big) in enumerate(((0.6, 0.7), (0.8, 0.75))):
        (tmp_path / f"f{i}").mkdir()
        (tmp_path / f"f{i}" / infer.POSTPROCESSING).write_text(json.dumps(
            dict(one_piece=None, evidence=[dict(case=f"c{i}", pieces=3, dsc_raw=raw,
                                                dsc_one_piece=big)])))
    rows = train.pooled_evidence([tmp_path / "f0", tmp_path / "f1"])
    assert [r["case"] for r in rows] == ["c0", "c1"] and train.one_piece_decision(rows)
    with pytest.raises(SystemExit) as e:
        train.pooled_evidence([tmp_path / "f0", tmp_path / "nowhere"])
    assert "nowhere" in str(e.value) and "\n" not in str(e.value)
    # the decision file is what infer.py follows; a broken one is a one-line error
    (tmp_path / "f0" / infer.POSTPROCESSING).write_text(json.dumps(dict(one_piece=True)))
    assert infer.run_postprocessing(tmp_path / "f0") is True
    assert infer.run_postprocessing(tmp_path / "f1") is False        # undecided: raw
    assert infer.run_postprocessing(tmp_path) is False               # no file: raw
    (tmp_path / "f1" / infer.POSTPROCESSING).write_text("{not json")
    with pytest.raises(ValueError, match="not a train.py post-processing decision"):
        infer.run_postprocessing(tmp_path / "f1")
