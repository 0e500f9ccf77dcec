"""Tests of metricunet.py against Table I's numbers, scipy, brute force and hand-worked examples."""
import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

import metricunet as M


def named(t):
    """A sampler's plain (anchor, positive, negative, valid) tuple with the fields by name, for
    readable tests."""
    from types import SimpleNamespace
    return SimpleNamespace(**dict(zip(("anchor", "positive", "negative", "valid"), t)))

# Table I's '#' column, in thousands, for every layer with weights (block 4 renamed conv4a/conv4b).
TABLE_I_K = {
    "conv1a": 0.9, "conv1b": 9, "conv2a": 18, "conv2b": 37, "conv3a": 74, "conv3b": 147,
    "conv4a": 295, "conv4b": 590, "upconv4a": 131, "conv4c": 295, "conv4d": 147,
    "upconv5a": 32, "conv5c": 73, "conv5d": 37, "upconv6a": 66, "conv6c": 664, "conv6d": 590,
    "sega": 66, "segb": 0.5,
}


def conv_weight_count(layer):
    conv = layer[0] if isinstance(layer, torch.nn.Sequential) else layer
    return conv.weight.numel()


def test_table_i_total_parameters():
    n = M.count_parameters(M.MetricUNet())
    assert abs(n - 3.28e6) / 3.28e6 < 0.005


@pytest.mark.parametrize("name,k", TABLE_I_K.items())
def test_table_i_each_layer(name, k):
    # the table prints whole thousands (one decimal below 1 K), rounding inconsistently (73.7 K ->
    # '73K', 36.9 K -> '37K'), so a layer matches when it is within one printed unit; a wrong
    # channel count or kernel size is off by a factor of two or more
    w = conv_weight_count(getattr(M.MetricUNet(), name))
    assert abs(w - 1000 * k) < (1000 if k >= 1 else 100)


def test_sega_is_1x1_and_width_multiplier_scales():
    net = M.MetricUNet()
    assert net.sega[0].kernel_size == (1, 1)
    half = M.count_parameters(M.MetricUNet(width=0.5))
    assert 0.2 < half / M.count_parameters(net) < 0.3          # conv params scale ~ width^2


@pytest.mark.parametrize("cls,cin", [(M.MetricUNet, 3), (M.MetricUNetPlusPlus, 3),
                                     (M.LightUNet, 5)])
def test_forward_shapes(cls, cin):
    net = cls() if cls is not M.MetricUNet else cls(width=0.25)
    logits, feats = net(torch.randn(2, cin, 32, 48))
    assert logits.shape == (2, 2, 32, 48)
    assert feats.shape == (2, net.feature_channels, 32, 48)


def test_bad_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 8"):
        M.MetricUNet(width=0.25)(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expected input"):
        M.MetricUNet(width=0.25)(torch.randn(1, 5, 32, 32))


def test_table_ii_has_twelve_rows_and_metric_adds_no_weights():
    assert list(M.CONFIGS) == ["UNet", "UNet++", "R-Sep", "R", "H", "++H", "C", "HR", "HC", "HP",
                               "HRP", "HCP"]
    unet = M.count_parameters(M.MetricUNet())
    for cfg in M.CONFIGS.values():
        if cfg.backbone == "unet":
            assert M.count_parameters(M.build_model(cfg)) == unet
    assert M.get_config("MetricUNet-HCP").samplers == ("hard", "contour")
    assert M.get_config("metricunet++-h").backbone == "unetpp"
    assert M.get_config("HRP").pair_term and not M.get_config("HR").pair_term
    with pytest.raises(ValueError, match="Table II"):
        M.get_config("XYZ")


# ---------------------------------------------------------------- samplers

def blob_labels(n=4, h=32, w=32, seed=0):
    """Each image gets its own, differently placed random blob, so 'from the anchor's image' is
    checkable."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((n, h, w), dtype=np.int64)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        cy, cx = rng.integers(h // 4, h - h // 4), rng.integers(w // 4, w - w // 4)
        r = rng.integers(2, max(3, min(h, w) // 5))
        # label values 1 and 2 are prostate
        lab[i] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) * (i % 2 + 1)
    return torch.from_numpy(lab)


def check_common(t, lab, k, m):
    N = lab.shape[0]
    flat = lab.flatten(1) > 0
    assert t.anchor.shape == (N, k)
    assert t.positive.shape == t.negative.shape == (N, k, m)
    for i in range(N):                      # per image, by brute force
        if not t.valid[i].all():
            continue
        assert flat[i, t.anchor[i]].all()
        assert flat[i, t.positive[i]].all()           # same label as the anchor (prostate)
        assert (~flat[i, t.negative[i]]).all()        # opposite label


def test_random_sampler_invariants():
    lab = blob_labels()
    t = named(M.random_sampler(lab, k=7, m=3, generator=torch.Generator().manual_seed(1)))
    assert t.valid.all()
    check_common(t, lab, 7, 3)


def test_focal_hard_anchors_satisfy_eq1():
    lab = blob_labels()
    rng = np.random.default_rng(2)
    probs = torch.from_numpy(rng.uniform(0, 1, lab.shape)).float()
    t = named(M.focal_hard_negative_sampler(lab, probs, k=50, m=1, tau=0.1,
                                            generator=torch.Generator().manual_seed(0)))
    check_common(t, lab, 50, 1)
    for i in range(lab.shape[0]):
        a = t.anchor[i]
        y = (lab[i].flatten() > 0).float()
        assert ((probs[i].flatten()[a] - y[a]).abs() > 0.1).all()


def test_focal_hard_without_hard_voxels_is_invalid():
    lab = blob_labels()
    probs = (lab > 0).float() * 0.95                  # every voxel within tau of its label
    probs[1] = 0.0                                    # image 1: all prostate voxels missed -> hard
    t = named(M.focal_hard_negative_sampler(lab, probs, k=5,
                                            generator=torch.Generator().manual_seed(0)))
    assert t.valid.tolist() == [[False] * 5, [True] * 5, [False] * 5, [False] * 5]


def test_contour_anchors_on_scipy_boundary():
    lab = blob_labels(n=3)
    lab[2, :10, :] = 1                                # a blob cut by the patch border
    t = named(M.contour_aware_sampler(lab, k=400, m=2, generator=torch.Generator().manual_seed(3)))
    check_common(t, lab, 400, 2)
    for i in range(3):
        mask = lab[i].numpy() > 0
        boundary = mask & ~ndimage.binary_erosion(mask, np.ones((3, 3)), border_value=1)
        drawn = np.zeros(mask.size, bool)
        drawn[t.anchor[i].numpy()] = True
        assert not (drawn & ~boundary.ravel()).any()  # every anchor on the boundary
        assert drawn.sum() > 0.8 * boundary.sum()     # and the boundary is covered (400 draws)


def test_empty_images_are_invalid_not_crashes():
    lab = torch.zeros(3, 16, 16, dtype=torch.long)
    lab[1] = 1                                        # all prostate: no negatives
    lab[2, 4:8, 4:8] = 1
    for t in (M.random_sampler(lab), M.contour_aware_sampler(lab),
              M.focal_hard_negative_sampler(lab, torch.zeros(3, 16, 16))):
        assert named(t).valid[:, 0].tolist() == [False, False, True]


def test_samplers_reproducible_from_generator():
    lab = blob_labels()
    a = M.random_sampler(lab, generator=torch.Generator().manual_seed(7))
    b = M.random_sampler(lab, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- Eq. 2

def tuples_1(anchor, pos, neg):
    t = lambda v: torch.tensor(v).view(1, 1, -1)
    return torch.tensor([[anchor]]), t(pos), t(neg), torch.tensor([[True]])


def test_eq2_hand_worked_raw_features():
    # voxels 0..2 with 2-d features a=(0,0), p=(1,0), n=(0,0.5): d_ap=1, d_an=0.25
    feats = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.5]]).view(1, 2, 1, 3)
    loss = M.metric_loss(feats, tuples_1(0, [1], [2]), sigma=0.7, beta=0.1, eps=0.01,
                         normalize=False)
    # triplet max(0, 1 - 0.25 + 0.7) = 1.45; pair 0.1 * max(0, 1 - 0.01) = 0.099
    assert loss.item() == pytest.approx(1.549, abs=1e-6)
    feats[0, 0, 0, 2] = 3.0                           # n=(3,0.5): d_an = 9.25, hinge is 0
    loss = M.metric_loss(feats, tuples_1(0, [1], [2]), normalize=False)
    assert loss.item() == pytest.approx(0.099, abs=1e-6)


def test_eq2_hand_worked_normalised_features():
    # a=(2,0), p=(0,3), n=(-5,0) -> unit vectors (1,0), (0,1), (-1,0): d_ap=2, d_an=4
    feats = torch.tensor([[2.0, 0.0, -5.0], [0.0, 3.0, 0.0]]).view(1, 2, 1, 3)
    loss = M.metric_loss(feats, tuples_1(0, [1], [2]), sigma=0.7, beta=0.1, eps=0.01)
    assert loss.item() == pytest.approx(0.1 * 1.99, abs=1e-6)   # triplet max(0, 2-4+0.7)=0


def test_eq2_against_brute_force_loops():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 5, 8, 8, generator=g)
    lab = blob_labels(3, 8, 8, seed=4) * 0
    lab[:, 2:6, 2:6] = 1
    lab[2] = 0                                        # an invalid image
    t = named(M.random_sampler(lab, k=4, m=2, generator=g))
    got = M.metric_loss(feats, tuple(vars(t).values()), sigma=0.5, beta=0.3, eps=0.2,
                        normalize=True).item()
    f = feats.flatten(2)
    f = f / f.norm(dim=1, keepdim=True)
    want = 0.0
    for n, kk in itertools.product(range(3), range(4)):
        if not t.valid[n, kk]:
            continue
        a = f[n, :, t.anchor[n, kk]]
        for j in range(2):
            d_ap = float(((a - f[n, :, t.positive[n, kk, j]]) ** 2).sum())
            want += 0.3 * max(0.0, d_ap - 0.2)
            for q in range(2):
                d_an = float(((a - f[n, :, t.negative[n, kk, q]]) ** 2).sum())
                want += max(0.0, d_ap - d_an + 0.5)
    assert got == pytest.approx(want, rel=1e-5)


def test_no_tuples_gives_attached_exact_zero():
    net = M.MetricUNet(width=0.125)
    _, feats = net(torch.randn(2, 3, 16, 16))
    t = M.random_sampler(torch.zeros(2, 16, 16, dtype=torch.long))
    loss = M.metric_loss(feats, t)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert net.conv1a[0].weight.grad is not None and net.conv1a[0].weight.grad.abs().sum() == 0


# ---------------------------------------------------------------- gradient routing

def grads(net):
    return {n: (p.grad is not None and p.grad.abs().sum().item() > 0)
            for n, p in net.named_parameters()}


def test_metric_loss_alone_trains_the_encoder():
    torch.manual_seed(0)
    net = M.MetricUNet(width=0.125)
    lab = blob_labels(2, 16, 16)
    _, feats = net(torch.randn(2, 3, 16, 16))
    M.metric_loss(feats, M.random_sampler(lab, k=10)).backward()
    g = grads(net)
    assert g["conv1a.0.weight"] and g["conv4b.0.weight"] and g["conv6d.0.weight"]
    assert not g["segb.weight"] and not g["sega.0.weight"]


def test_r_sep_routing():
    torch.manual_seed(0)
    cfg = M.get_config("R-Sep")
    net = M.build_model(cfg, width=0.125)
    lab = blob_labels(2, 16, 16)
    logits, feats = net(torch.randn(2, 3, 16, 16), detach_head_input=cfg.separate)
    _, parts = M.total_loss(logits, feats, lab, cfg)
    parts["ce"].backward(retain_graph=True)
    g = grads(net)
    assert g["segb.weight"] and g["sega.0.weight"]
    assert not g["conv1a.0.weight"] and not g["conv6d.0.weight"]
    net.zero_grad(set_to_none=True)
    parts["random"].backward()
    g = grads(net)
    assert g["conv1a.0.weight"] and g["conv6d.0.weight"] and not g["segb.weight"]


def test_total_loss_is_eq4():
    torch.manual_seed(0)
    cfg = M.get_config("HCP")
    net = M.build_model(cfg, width=0.125)
    lab = blob_labels(2, 16, 16)
    logits, feats = net(torch.randn(2, 3, 16, 16))
    loss, parts = M.total_loss(logits, feats, lab, cfg, M.Settings(lam=0.03),
                               torch.Generator().manual_seed(0))
    assert set(parts) == {"ce", "hard", "contour"}
    # by hand: each strategy drawn in Table II's order from the same generator, Eq. 2 one strategy
    # at a time
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(logits.detach(), 1)[:, 1]
    hard = M.metric_loss(feats, M.focal_hard_negative_sampler(lab, probs, 20, 1, 0.1, g), 0.7, 0.1,
                         0.01)
    contour = M.metric_loss(feats, M.contour_aware_sampler(lab, 20, 1, g), 0.7, 0.1, 0.01)
    ce = torch.nn.functional.cross_entropy(logits, (lab > 0).long())
    assert parts["hard"].item() == pytest.approx(hard.item(), rel=1e-5)
    assert parts["contour"].item() == pytest.approx(contour.item(), rel=1e-5)
    assert loss.item() == pytest.approx((ce + 0.03 * (hard + contour)).item(), rel=1e-5)


def test_poly_lr():
    assert M.poly_lr(0.01, 0, 100) == 0.01
    assert M.poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert M.poly_lr(0.01, 100, 100) == 0.0


def test_hcr_is_table_i_and_fig_4s_configuration():
    hcr = M.get_config("MetricUNet-HCR")
    assert hcr.samplers == ("hard", "contour", "random")
    assert not hcr.pair_term and "Table I" in hcr.source
    assert "HCR" not in M.CONFIGS                                     # not a Table II row
    logits = torch.randn(2, 2, 16, 16)
    feats = torch.randn(2, 8, 16, 16)
    lab = torch.zeros(2, 16, 16, dtype=torch.long)
    lab[:, 4:12, 4:12] = 1
    _, parts = M.total_loss(logits, feats, lab, hcr, generator=torch.Generator().manual_seed(0))
    assert set(parts) == {"ce", "hard", "contour", "random"}  # one L_metric,t per strategy (Eq. 4)


def test_margin_violations_against_a_loop():
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.nn.functional.normalize(torch.randn(200, 8, generator=g), dim=1)
               for _ in range(3))
    d2 = lambda x, y, i: sum((x[i, j] - y[i, j]) ** 2 for j in range(8))
    want = sum(1 for i in range(200) if d2(a, p, i) - d2(a, n, i) + 0.7 > 0) / 200
    assert M.margin_violations(a, p, n, 0.7) == pytest.approx(float(want))
    assert M.margin_violations(a, a, -a, 0.7) == 0.0            # d_ap = 0, d_an = 4 > 0.7: none


def test_fisher_ratio_by_hand():
    # prostate at (0, 0) and (2, 0): mean (1, 0), spread 1; background at (5, 1) and (5, -1): mean
    # (5, 0), spread 1. Squared distance of the means 16, over 1 + 1: 8.
    fp = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    fb = torch.tensor([[5.0, 1.0], [5.0, -1.0]])
    assert M.fisher_ratio(fp, fb) == pytest.approx(8.0)
