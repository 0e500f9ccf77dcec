"""Issue 10's additions where the paper is silent, against independent computation: the anti-aliased 1/4
down-sampling (constant, checkerboard, grid alignment), patch augmentation that keeps image and label aligned
(an analytically transformed ellipse), and --paper-strict giving exactly Eq. 3 / Eq. 4 with no augmentation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import metricunet as M
import train


# ------------------------------------------------------------------ anti-aliased down-sampling (Section III-A)

def test_antialias_keeps_a_constant():
    v = np.full((37, 29, 21), 117.0, np.float32)
    out = data.stage1_volume(v, antialias=True)
    assert out.shape == (10, 8, 6)                                   # (n - 1) // 4 + 1 per axis
    assert np.allclose(out, 117.0, atol=1e-3)


def test_antialias_averages_a_checkerboard_that_decimation_aliases():
    idx = np.indices((48, 48, 48)).sum(0)
    board = (idx % 2).astype(np.float32)                             # the highest frequency the grid holds
    plain = data.stage1_volume(board)                                # trilinear at 4j = v[::4, ::4, ::4]
    assert np.array_equal(plain, board[::4, ::4, ::4])               # decimation: all 0 here, the mean is 0.5
    assert plain.max() == 0.0
    smooth = data.stage1_volume(board, antialias=True)
    # a Gaussian of sigma 1.5 leaves exp(-2 pi^2 sigma^2 f^2) = 1.5e-5 of a frequency-1/2 wave per axis
    interior = smooth[2:-2, 2:-2, 2:-2]
    assert np.allclose(interior, 0.5, atol=1e-3)


def test_antialias_keeps_the_grid_alignment():
    """Coarse voxel j sits at input voxel 4j with and without anti-aliasing: a ball's centroid maps back."""
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
    ident = dict(angle=0.0, scale=1.0, flip=False, gamma=1.0, contrast=1.0, brightness=0.0, noise_sd=0.0, noise_seed=0)
    x, y = data.augment_patch([img], lab, (10 + 31.5, 7 + 31.5), 64, ident)
    assert np.allclose(x[..., 0], img[10:74, 7:71] / 255.0, atol=1e-6)
    assert np.array_equal(y, lab[10:74, 7:71])


@pytest.mark.parametrize("angle_deg,scale,flip", [(12.0, 1.1, True), (-14.0, 0.87, False), (0.0, 1.0, True)])
def test_augmentation_keeps_image_and_label_aligned(angle_deg, scale, flip):
    """An ellipse (image = 200 inside, 20 outside; label = inside) through a known rotation, zoom and mirror:
    the transformed label is the ellipse transformed by hand, and the transformed image is bright exactly there."""
    shape, centre, radii, tilt = (120, 110), (63.0, 52.0), (22.0, 11.0), 0.3
    lab = ellipse(shape, centre, radii, tilt).astype(np.uint8)
    img = np.where(lab > 0, 200, 20).astype(np.uint8)
    patch_centre = (60.5, 55.5)                                      # x0 + 31.5, as PatchDataset makes them
    params = dict(angle=math.radians(angle_deg), scale=scale, flip=flip, gamma=1.0, contrast=1.0, brightness=0.0,
                  noise_sd=0.0, noise_seed=0)
    x, y = data.augment_patch([img, img, img], lab, patch_centre, 64, params)
    # by hand: output pixel u (from the patch centre) reads input c + R(a) F u / s, so the ellipse seen in the
    # output is centred at F R(-a) s (centre - c), with axes scaled by s and tilt mirrored/rotated accordingly
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
    bright = x[..., 1] >= (109.9 / 255)                                # 110 = occupancy 0.5, the label threshold
    assert (bright == y.astype(bool)).mean() > 0.99                    # image and label agree


def test_augmented_patches_vary_by_epoch_and_are_reproducible():
    rng = np.random.default_rng(1)
    vols = [rng.integers(0, 255, (80, 80, 12), dtype=np.uint8)]
    labs = [np.zeros((80, 80, 12), np.uint8)]
    labs[0][30:50, 30:50, 3:9] = 1
    ds = data.PatchDataset(vols, labs, patch=64, n_slices=3, patches_per_image=10, seed=4, augment=True)
    a0, b0 = ds[3], ds[3]
    a1 = ds[3 + len(ds)]                                               # same patch, next epoch
    assert torch.equal(a0[0], b0[0]) and torch.equal(a0[1], b0[1])    # seeded
    assert not torch.equal(a0[0], a1[0])                               # a new variant every epoch
    plain = data.PatchDataset(vols, labs, patch=64, n_slices=3, patches_per_image=10, seed=4)
    assert torch.equal(plain[3][0], plain[3 + len(plain)][0])         # without augmentation: the fixed patch set


# ------------------------------------------------------------------ --paper-strict

def test_paper_strict_turns_every_addition_off():
    for preset in train.PRESETS:
        a = train.parse_args(["--preset", preset, "--paper-strict"])
        assert (a.stage1_antialias, a.stage1_loss, a.augment, a.hard_negatives) == (False, "ce", "off", False)
    a = train.parse_args(["--preset", "paper"])
    assert (a.stage1_antialias, a.stage1_loss, a.augment, a.hard_negatives) == (False, "ce", "off", False)
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
    assert hp == M.PAPER_DEFAULTS                                      # Eq. 1-4 at the paper's values
    loss1, _ = train.step_loss(logits, feats, labels, M.get_config("UNet"), hp, g,
                               dice=a.stage1_loss == "dice_ce")
    assert loss1.item() == F.cross_entropy(logits, labels).item()      # Eq. 3, nothing added
    cfg = M.get_config("R")
    loss2, _ = train.step_loss(logits, feats, labels, cfg, hp, torch.Generator().manual_seed(5))
    t = M.random_sampler(labels, 20, 1, torch.Generator().manual_seed(5))
    want = F.cross_entropy(logits, labels) + 0.01 * M.metric_loss(feats, t, 0.7, 0.0, 0.01)   # Eq. 4, R row
    assert loss2.item() == pytest.approx(want.item(), rel=1e-6)
    small = train.parse_args(["--preset", "cpu"])                     # the small-data preset adds soft Dice
    loss_dice, _ = train.step_loss(logits, feats, labels, M.get_config("UNet"), train.metric_settings(small),
                                   g, dice=small.stage1_loss == "dice_ce")
    p = torch.softmax(logits, 1)[:, 1]
    dice = 1 - (2 * (p * labels).sum() + 1e-5) / (p.sum() + labels.sum() + 1e-5)
    assert loss_dice.item() == pytest.approx((F.cross_entropy(logits, labels) + dice).item(), rel=1e-6)


# ------------------------------------------------------------------ --hard-negatives (Section III-B-2 ii, other reading)

def test_hard_negatives_are_the_networks_false_positives():
    lab = torch.zeros(3, 16, 16, dtype=torch.long)
    lab[:, 4:10, 4:10] = 1
    probs = torch.where(lab > 0, 0.95, 0.02)                       # a good prediction ...
    probs[0, 12:14, 12:15] = 0.8                                   # ... image 0: 6 false positives
    probs[0, 5, 5] = 0.3                                           # and one missed prostate voxel
    probs[1, 0, 0:2] = 0.6                                         # image 1: 2 false positives, nothing missed
    # image 2: no mistake at all
    a, p, n, v = M.focal_hard_negative_sampler(lab, probs, k=60, m=2, tau=0.1,
                                               generator=torch.Generator().manual_seed(0), hard_negatives=True)
    y = (lab > 0).flatten(1).numpy()
    fp = ((probs.flatten(1) > 0.1) & (lab.flatten(1) == 0)).numpy()   # Eq. 1 on background voxels, by hand
    assert bool(v.all())
    assert set(a[0].tolist()) == {5 * 16 + 5}                      # the one missed voxel is the anchor
    for i in (0, 1):
        assert fp[i, n[i].numpy()].all()                           # negatives: false positives only
    assert y[1, a[1].numpy()].all() and len(set(a[1].tolist())) > 10   # nothing missed: any prostate voxel
    assert (~y[2, n[2].numpy()]).all() and len(set(n[2].flatten().tolist())) > 30   # no FP: all background
    # the printed reading: image 1 and 2 have no hard positive, so no tuple; negatives from all background
    a0, _, n0, v0 = M.focal_hard_negative_sampler(lab, probs, k=60, m=2, tau=0.1,
                                                  generator=torch.Generator().manual_seed(0))
    assert v0[:, 0].tolist() == [True, False, False] and not fp[0, n0[0].numpy()].all()
