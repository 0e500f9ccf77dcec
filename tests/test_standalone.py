"""The coursework use case: a sampler (and Eq. 2's metric_loss) copied alone into a new file runs
alone.

Each function's source is cut out of metricunet.py with ast.get_source_segment and executed in a
fresh namespace that holds nothing but `torch` and `torch.nn.functional as F`, exactly what a
student's new module would import. The draws are then checked against independent computations:
numpy label sets, Eq. 1 written out by hand, and the contour from scipy.ndimage.binary_erosion; Eq.
2 against a brute-force loop.
"""
import ast
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
SOURCE = (ROOT / "metricunet.py").read_text()


def pasted_alone(*names):
    """The named top-level functions of metricunet.py, exec'd in a namespace holding only torch and
    F."""
    tree = ast.parse(SOURCE)
    namespace = {"torch": torch, "F": F}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            code = ast.get_source_segment(SOURCE, node)
            exec(compile(code, f"<pasted {node.name}>", "exec"), namespace)
    missing = [n for n in names if n not in namespace]
    assert not missing, f"not found in metricunet.py: {missing}"
    return [namespace[n] for n in names]


def labels_2x16x16():
    """Two 16x16 label maps: a 6x8 rectangle, and a disc of radius 5 that touches nothing."""
    lab = np.zeros((2, 16, 16), np.int64)
    lab[0, 4:10, 3:11] = 1
    yy, xx = np.mgrid[:16, :16]
    lab[1] = (yy - 8) ** 2 + (xx - 7) ** 2 <= 25
    return lab


def check_labels(lab, anchor, positive, negative, valid, k, m):
    N = lab.shape[0]
    assert tuple(anchor.shape) == (N, k)
    assert tuple(positive.shape) == tuple(negative.shape) == (N, k, m)
    assert valid.dtype == torch.bool and bool(valid.all())
    flat = lab.reshape(N, -1) > 0
    for i in range(N):
        assert flat[i, positive[i].numpy()].all()  # positives: prostate voxels of the same image
        # negatives: background voxels of the same image
        assert (~flat[i, negative[i].numpy()]).all()


def test_random_sampler_alone():
    (random_sampler,) = pasted_alone("random_sampler")
    lab = labels_2x16x16()
    a, p, n, v = random_sampler(torch.from_numpy(lab), k=30, m=2,
                                generator=torch.Generator().manual_seed(0))
    check_labels(lab, a, p, n, v, 30, 2)
    flat = lab.reshape(2, -1) > 0
    assert all(flat[i, a[i].numpy()].all() for i in range(2))   # anchors: prostate voxels


def test_focal_hard_negative_sampler_alone():
    (focal_hard_negative_sampler,) = pasted_alone("focal_hard_negative_sampler")
    lab = labels_2x16x16()
    probs = np.random.default_rng(1).uniform(0, 1, lab.shape).astype(np.float32)
    a, p, n, v = focal_hard_negative_sampler(torch.from_numpy(lab), torch.from_numpy(probs), k=40,
                                             m=1, tau=0.1,
                                             generator=torch.Generator().manual_seed(0))
    check_labels(lab, a, p, n, v, 40, 1)
    # Eq. 1 by hand: a hard positive anchor is a prostate voxel whose probability is more than tau
    # from 1
    hard_positive = (lab > 0) & (np.abs(probs - (lab > 0)) > 0.1)
    for i in range(2):
        assert hard_positive[i].ravel()[a[i].numpy()].all()


def test_contour_aware_sampler_alone():
    (contour_aware_sampler,) = pasted_alone("contour_aware_sampler")
    lab = labels_2x16x16()
    a, p, n, v = contour_aware_sampler(torch.from_numpy(lab), k=300, m=1,
                                       generator=torch.Generator().manual_seed(0))
    check_labels(lab, a, p, n, v, 300, 1)
    for i in range(2):
        mask = lab[i] > 0
        contour = mask & ~ndimage.binary_erosion(mask, np.ones((3, 3)), border_value=1)
        drawn = np.zeros(mask.size, bool)
        drawn[a[i].numpy()] = True
        assert not (drawn & ~contour.ravel()).any()           # every anchor on scipy's contour
        assert drawn.sum() > 0.8 * contour.sum()              # and 300 draws cover most of it


def test_metric_loss_alone_next_to_a_sampler():
    random_sampler, metric_loss = pasted_alone("random_sampler", "metric_loss")
    lab = torch.from_numpy(labels_2x16x16())
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 4, 16, 16, generator=g)
    t = random_sampler(lab, k=5, m=2, generator=g)
    got = metric_loss(feats, t, sigma=0.7, beta=0.1, eps=0.01).item()
    a_idx, p_idx, n_idx, _ = t
    f = feats.flatten(2)
    f = f / f.norm(dim=1, keepdim=True)  # L2-normalised per voxel, as documented
    want = 0.0
    for i, kk in itertools.product(range(2), range(5)):       # Eq. 2 with hinges, brute force
        a = f[i, :, a_idx[i, kk]]
        for j in range(2):
            d_ap = float(((a - f[i, :, p_idx[i, kk, j]]) ** 2).sum())
            want += 0.1 * max(0.0, d_ap - 0.01)
            for q in range(2):
                d_an = float(((a - f[i, :, n_idx[i, kk, q]]) ** 2).sum())
                want += max(0.0, d_ap - d_an + 0.7)
    assert got == pytest.approx(want, rel=1e-5)


def test_readme_sampler_example_runs_as_printed():
    """The README's 'Use a sampler in your own code' block, executed as printed from the repository
    root."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use a sampler in your own code", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    import os
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(block, "README example", "exec"), namespace)
    finally:
        os.chdir(cwd)
    loss = namespace["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    assert namespace["feats"].grad is not None  # the example back-propagates into the features
    assert namespace["feats"].grad is not None and namespace["feats"].grad.abs().sum() > 0
