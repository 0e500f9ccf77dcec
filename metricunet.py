"""MetricUNet: the networks, the three online voxel samplers and the losses of He et al. (2021).

K. He, C. Lian, E. Adeli, J. Huo, Y. Gao, B. Zhang, J. Zhang, D. Shen, "MetricUNet: Synergistic
image- and voxel-level learning for precise prostate segmentation via online sampling", Medical
Image Analysis 71, 102039 (2021), https://doi.org/10.1016/j.media.2021.102039 (arXiv:2005.07462).
Read this file beside Section III of the paper:

    Section III-A   LightUNet                    the Stage-1 detector ("filter number of 32")
    Section III-B-1 MetricUNet                   Table I, the Stage-2 2.5D UNet (3.28 M parameters)
                    MetricUNetPlusPlus           the UNet++ backbone of Table II's UNet++ rows
    Section III-B-2 random_sampler               i)   random sampling
                    focal_hard_negative_sampler  ii)  focal hard negative sampling, Eq. 1
                    contour_aware_sampler        iii) contour-aware sampling
    Section III-B-3 metric_loss                  Eq. 2 (triplet term + beta * positive-pair term)
                    total_loss                   Eq. 3 (cross-entropy), Eq. 4 (CE + lambda sum_t)
                    Settings, PAPER_DEFAULTS     k, m, sigma, eps, beta, lambda, tau (III-B, IV-B)
    Section IV-D    CONFIGS, get_config          the twelve configurations of Table II
    Section I       margin_violations, fisher_ratio   the claim of "a discriminate embedding space"

`import metricunet` has no side effects and needs only torch. Every sampler is a standalone function
that uses nothing else from this file, so it can be copied into coursework alone.

Conventions used throughout:
    x       input slices, (N, C_in, H, W); Stage 2: C_in = 3 adjacent axial slices (2.5D, IV-B)
    labels  (N, H, W) integer or bool map of the *middle* slice; > 0 is prostate
    feats   (N, d, H, W) the conv6d feature map the samplers read (d = 256 at the paper's width)
    logits  (N, 2, H, W)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Settings:
    """The metric module's hyper-parameters (Sections III-B and IV-B). The defaults are the
    paper's."""
    k: int = 20             # anchors per image (Section III-B-2, Table V)
    m: int = 1              # positives and negatives per anchor (Table III caption)
    sigma: float = 0.7      # triplet margin (Eq. 2; Fig. 6 picks 0.7, Table III's caption says 1.0)
    eps: float = 0.01       # positive-pair distance (Eq. 2)
    beta: float = 0.1       # weight of the positive-pair term (Eq. 2)
    lam: float = 0.01       # weight of the metric losses against cross-entropy (Eq. 4)
    tau: float = 0.1        # focal-hard threshold (Eq. 1)
    normalize: bool = True  # Paper is silent: Eq. 2 on L2-normalised features (see metric_loss)
    hard_negatives: bool = False   # Paper is ambiguous: see focal_hard_negative_sampler


PAPER_DEFAULTS = Settings()


# --------------------------------------------------------------------------------------------------
# Networks (Section III-A, III-B-1, Table I)
# --------------------------------------------------------------------------------------------------

def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3) -> nn.Sequential:
    """Table I's 'conv+bn+r' with params {kernel, stride 1, padding kernel//2}.

    Paper is silent on the convolution bias, and the totals do not decide it: both readings round to
    the paper's "3.28 million" (3,279,842 with a bias, 3,277,730 without), and no '#' entry of Table
    I is printed precisely enough to tell. We keep what a plain nn.Conv2d gives (bias=True) because
    before BatchNorm the bias cannot matter: BN subtracts the batch mean, which removes any constant
    per channel, and its own shift replaces it. The choice changes 2,112 parameters and nothing the
    network can compute."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=1, padding=kernel // 2),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _scaled(width: float):
    """Width multiplier for CPU presets: every layer's channel count is scaled by `width` (1.0 =
    Table I)."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return lambda n: max(1, int(round(n * width)))


def _check_input(x: torch.Tensor, in_channels: int, multiple: int = 8) -> None:
    """Three 2x2 poolings need H and W divisible by 8; say so instead of failing inside
    torch.cat."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"expected input (N, {in_channels}, H, W), got {tuple(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"H and W must be divisible by {multiple} (three 2x2 poolings), got "
                         f"{tuple(x.shape[2:])}")


class MetricUNet(nn.Module):
    """Stage-2 network of Table I (Section III-B-1), layer names as in the table.

    Three down-sampling blocks, a bottleneck block and three up-sampling blocks with skip
    connections, then the segmentation sub-network (sega, segb). The voxel-metric sub-networks
    (samph, sampc, sampr) are not layers: they read the conv6d feature map and add no learnable
    weights (Section I, third bullet), so every MetricUNet configuration has exactly UNet's
    parameter count.

    Where Table I's text and its '#' column disagree, we follow the counts:
      * block 4's layers are printed as 'conv3a/conv3b' with input 'pool2'; they are conv4a/conv4b
        on pool3
        (295 K = 128*256*9 and 590 K = 256*256*9 only fit that reading);
      * upconv5a's input is printed as 'conv4c'; we use conv4d, the last layer of upblock1;
      * upconv6a has 66 K = 64*256*2*2 parameters, so it outputs 256 channels, and conv6c then takes
        256 + 32 = 288 channels (288*256*9 = 664 K);
      * sega is printed as 3x3 but has 66 K = 256*256*1*1 parameters, so it is a 1x1 convolution.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: float = 1.0):
        super().__init__()
        c = _scaled(width)
        self.in_channels = in_channels
        self.feature_channels = c(256)
        # conv block 1-3: encoder
        self.conv1a, self.conv1b = conv_bn_relu(in_channels, c(32)), conv_bn_relu(c(32), c(32))
        self.conv2a, self.conv2b = conv_bn_relu(c(32), c(64)), conv_bn_relu(c(64), c(64))
        self.conv3a, self.conv3b = conv_bn_relu(c(64), c(128)), conv_bn_relu(c(128), c(128))
        # conv block 4: bottleneck at 1/8 resolution (printed as conv3a/conv3b in Table I)
        self.conv4a, self.conv4b = conv_bn_relu(c(128), c(256)), conv_bn_relu(c(256), c(256))
        # upblock 1-3: decoder; 'tconv' is a 2x2 transposed convolution with stride 2
        self.upconv4a = nn.ConvTranspose2d(c(256), c(128), 2, stride=2)
        self.conv4c, self.conv4d = conv_bn_relu(2 * c(128), c(128)), conv_bn_relu(c(128), c(128))
        self.upconv5a = nn.ConvTranspose2d(c(128), c(64), 2, stride=2)
        self.conv5c, self.conv5d = conv_bn_relu(2 * c(64), c(64)), conv_bn_relu(c(64), c(64))
        self.upconv6a = nn.ConvTranspose2d(c(64), c(256), 2, stride=2)
        self.conv6c = conv_bn_relu(c(256) + c(32), c(256))
        self.conv6d = conv_bn_relu(c(256), c(256))
        # segmentation sub-network
        self.sega = conv_bn_relu(c(256), c(256), kernel=1)
        self.segb = nn.Conv2d(c(256), num_classes, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder-decoder up to conv6d: the feature map xi of Eq. 2 that the samplers read."""
        _check_input(x, self.in_channels)
        c1 = self.conv1b(self.conv1a(x))
        c2 = self.conv2b(self.conv2a(F.max_pool2d(c1, 2)))
        c3 = self.conv3b(self.conv3a(F.max_pool2d(c2, 2)))
        c4 = self.conv4b(self.conv4a(F.max_pool2d(c3, 2)))
        u4 = self.conv4d(self.conv4c(torch.cat([self.upconv4a(c4), c3], 1)))   # concat4b
        u5 = self.conv5d(self.conv5c(torch.cat([self.upconv5a(u4), c2], 1)))   # concat5b
        return self.conv6d(self.conv6c(torch.cat([self.upconv6a(u5), c1], 1)))  # concat6b

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """Segmentation sub-network: sega, segb -> logits for lossce (Eq. 3)."""
        return self.segb(self.sega(feats))

    def forward(self, x: torch.Tensor, detach_head_input: bool = False):
        """Returns (logits, conv6d features).

        detach_head_input=True implements MetricUNet-R-Sep (Section IV-D): the head sees a detached
        copy of the features, so cross-entropy trains only sega/segb and the metric loss only the
        layers before."""
        feats = self.features(x)
        return self.head(feats.detach() if detach_head_input else feats), feats


class MetricUNetPlusPlus(nn.Module):
    """UNet++ backbone (Zhou et al. 2018, ref. [37]) for Table II's UNet++ and MetricUNet++-H rows.

    Paper is silent on its exact layout. We use the same encoder as Table I (32-64-128-256 channels,
    three poolings) and UNet++'s nested, densely connected skip nodes X[i][j] =
    conv(cat(X[i][0..j-1], up(X[i+1][j-1]))), each node two conv+bn+r layers of its level's width.
    The last node X[0][3] has 256 channels, like conv6d, so the samplers read a feature map of the
    same size, and the same sega/segb head follows."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: float = 1.0):
        super().__init__()
        c = _scaled(width)
        self.in_channels = in_channels
        self.feature_channels = c(256)
        widths = [c(32), c(64), c(128), c(256)]
        self.nodes = nn.ModuleDict()
        self.ups = nn.ModuleDict()
        for i, w in enumerate(widths):  # encoder column j = 0
            c_in = in_channels if i == 0 else widths[i - 1]
            self.nodes[f"{i}_0"] = nn.Sequential(conv_bn_relu(c_in, w), conv_bn_relu(w, w))
        for j in range(1, 4):
            for i in range(0, 4 - j):
                out = self.feature_channels if (i, j) == (0, 3) else widths[i]
                self.ups[f"{i}_{j}"] = nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                self.nodes[f"{i}_{j}"] = nn.Sequential(conv_bn_relu(widths[i] * (j + 1), out),
                                                       conv_bn_relu(out, out))
        self.sega = conv_bn_relu(self.feature_channels, self.feature_channels, kernel=1)
        self.segb = nn.Conv2d(self.feature_channels, num_classes, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels)
        X = {}
        for i in range(4):
            X[i, 0] = self.nodes[f"{i}_0"](x if i == 0 else F.max_pool2d(X[i - 1, 0], 2))
        for j in range(1, 4):
            for i in range(0, 4 - j):
                up = self.ups[f"{i}_{j}"](X[i + 1, j - 1])
                X[i, j] = self.nodes[f"{i}_{j}"](torch.cat([X[i, jj] for jj in range(j)] + [up], 1))
        return X[0, 3]

    head = MetricUNet.head
    forward = MetricUNet.forward


class LightUNet(nn.Module):
    """Stage-1 detector of Section III-A: "a conventional UNet architecture but with a reduced
    filter number of 32", trained on 64x64x5 patches of the 1/4-size CT (5 adjacent slices as
    channels).

    Paper is silent on the exact layout: we read "filter number of 32" as 32 filters in every
    convolution, with Table I's topology (three poolings, two conv+bn+r per block,
    transposed-convolution up-sampling)."""

    def __init__(self, in_channels: int = 5, num_classes: int = 2, filters: int = 32):
        super().__init__()
        f = filters
        self.in_channels = in_channels
        self.feature_channels = f
        self.down = nn.ModuleList([nn.Sequential(conv_bn_relu(in_channels if i == 0 else f, f),
                                                 conv_bn_relu(f, f))
                                   for i in range(4)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(f, f, 2, stride=2) for _ in range(3)])
        self.dec = nn.ModuleList([nn.Sequential(conv_bn_relu(2 * f, f), conv_bn_relu(f, f))
                                  for _ in range(3)])
        self.segb = nn.Conv2d(f, num_classes, 1)

    def forward(self, x: torch.Tensor, detach_head_input: bool = False):
        _check_input(x, self.in_channels)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            x = dec(torch.cat([up(x), skip], 1))
        return self.segb(x.detach() if detach_head_input else x), x


# --------------------------------------------------------------------------------------------------
# Online voxel samplers (Section III-B-2, Fig. 5). Each is self-contained: copy one alone.
# --------------------------------------------------------------------------------------------------

# What every sampler returns, a plain tuple (no class of this file: a sampler copied alone runs):
#   anchor    (N, k)    long   flat indices into the H*W voxels of the anchor's own image
#   positive  (N, k, m) long   m positives per anchor (same image, prostate)
#   negative  (N, k, m) long   m negatives per anchor (same image, background)
#   valid     (N, k)    bool   False for every anchor of an image that had no candidate anchor, no
#                              positive or no negative voxel (placeholders that metric_loss ignores)


def random_sampler(labels: torch.Tensor, k: int = 20, m: int = 1,
                   generator: torch.Generator | None = None) -> tuple:
    """i) Random sampling (Section III-B-2, Fig. 5a): anchors drawn uniformly from the voxels with
    positive (prostate) labels; positives from the positive voxels, negatives from the negative
    voxels of the same image.

    Paper is silent on replacement: we draw with replacement (torch.multinomial), so k anchors exist
    even when an image has fewer than k candidates, and a positive may coincide with its anchor
    (distance 0, harmless). Everything stays on labels.device; there is no Python loop over images
    or voxels and no host sync.

    Returns the tuple (anchor, positive, negative, valid): anchor (N, k) long, flat indices into the
    H*W voxels of each image; positive and negative (N, k, m) long, m of each per anchor from the
    same image; valid (N, k) bool, False for every anchor of an image without a candidate anchor,
    positive or negative voxel."""
    pos = (labels > 0).flatten(1)                       # J: positive-label voxels, (N, P)
    # random: any positive voxel may be an anchor
    anchor_candidates = pos
    N = pos.shape[0]
    # One multinomial over stacked [anchor | positive | negative] candidate maps. Rows without any
    # candidate get uniform weights (multinomial rejects all-zero rows) and are marked invalid.
    cand = torch.stack([anchor_candidates, pos, ~pos])  # (3, N, P)
    has_any = cand.any(-1)                              # (3, N)
    weights = torch.where(has_any[..., None], cand, torch.ones_like(cand)).float().flatten(0, 1)
    draw = torch.multinomial(weights, k * m, replacement=True,
                             generator=generator).view(3, N, k * m)
    valid = has_any.all(0)[:, None].expand(N, k)
    # anchor, positive, negative, valid
    return draw[0, :, :k], draw[1].view(N, k, m), draw[2].view(N, k, m), valid


def focal_hard_negative_sampler(labels: torch.Tensor, probs: torch.Tensor, k: int = 20, m: int = 1,
                                tau: float = 0.1, generator: torch.Generator | None = None,
                                hard_negatives: bool = False) -> tuple:
    """ii) Focal hard negative sampling (Section III-B-2, Eq. 1, Fig. 5b).

    Eq. 1: s_hard = 1 where |y_hat - y| > tau, with y_hat the predicted prostate probability (the
    heatmap of the segmentation sub-network) and y the label. The anchors are drawn from s_hard AND
    p, the positive voxels that the network currently gets wrong by more than tau ("positive hard
    sample map"). Positives and negatives are drawn at random by label, as in random sampling.

    Paper is ambiguous on the negatives: it names the strategy "focal hard *negative*" and says a
    voxel with s_hard = 1 "is labeled as a hard negative sample", but draws only the anchors from
    the hard map. hard_negatives=False (the default, `--preset paper`) is the text as printed above.
    hard_negatives=True (`train.py --hard-negatives`) mines both kinds of mistake: negatives come
    from the hard background voxels (false positives by more than tau) of the image when it has any
    (else from all background), and the anchors from all prostate voxels when none is missed (where
    the printed rule yields no tuple at all). The triplets then push the features of the network's
    own false positives away from the prostate's.

    probs: (N, H, W) prostate probability; it is only read (detached), never back-propagated
    through.

    Returns the tuple (anchor, positive, negative, valid): anchor (N, k) long, flat indices into the
    H*W voxels of each image; positive and negative (N, k, m) long, m of each per anchor from the
    same image; valid (N, k) bool, False for every anchor of an image without a candidate anchor,
    positive or negative voxel."""
    if probs.shape != labels.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and labels {tuple(labels.shape)} must have "
                         f"the same shape")
    y = (labels > 0)
    hard = (probs.detach() - y.to(probs.dtype)).abs() > tau   # Eq. 1
    pos = y.flatten(1)
    anchor_candidates = hard.flatten(1) & pos                 # positive hard sample map
    negative_candidates = ~pos
    if hard_negatives:                                        # mine false positives too (see above)
        hard_neg = hard.flatten(1) & ~pos
        negative_candidates = torch.where(hard_neg.any(-1, keepdim=True), hard_neg, ~pos)
        missed_any = anchor_candidates.any(-1, keepdim=True)
        anchor_candidates = torch.where(missed_any, anchor_candidates, pos)
    N = pos.shape[0]
    # Same draw as random_sampler (repeated so this function can be copied alone).
    cand = torch.stack([anchor_candidates, pos, negative_candidates])
    has_any = cand.any(-1)
    weights = torch.where(has_any[..., None], cand, torch.ones_like(cand)).float().flatten(0, 1)
    draw = torch.multinomial(weights, k * m, replacement=True,
                             generator=generator).view(3, N, k * m)
    valid = has_any.all(0)[:, None].expand(N, k)
    # anchor, positive, negative, valid
    return draw[0, :, :k], draw[1].view(N, k, m), draw[2].view(N, k, m), valid


def contour_aware_sampler(labels: torch.Tensor, k: int = 20, m: int = 1,
                          generator: torch.Generator | None = None) -> tuple:
    """iii) Contour-aware sampling (Section III-B-2, Fig. 5c): anchors drawn from the prostate
    boundary.

    Boundary = mask minus its erosion by a 3x3 square (8-connectivity), computed on the tensor's
    device as -max_pool(-mask). max_pool2d pads with -inf, so the image edge does not erode:
    prostate voxels cut by the patch border are not contour (the organ goes on outside the patch);
    this equals scipy.ndimage.binary_erosion(mask, np.ones((3, 3)), border_value=1).

    Paper is ambiguous on positives ("randomly selected according to the contour points"). We draw
    them from all prostate voxels, the set J of Eq. 2, so boundary features are pulled toward the
    interior's; negatives are drawn from all background voxels, as the paper says.

    Returns the tuple (anchor, positive, negative, valid): anchor (N, k) long, flat indices into the
    H*W voxels of each image; positive and negative (N, k, m) long, m of each per anchor from the
    same image; valid (N, k) bool, False for every anchor of an image without a candidate anchor,
    positive or negative voxel."""
    y = (labels > 0)
    mask = y.to(torch.float32)[:, None]                                 # (N, 1, H, W)
    eroded = -F.max_pool2d(-mask, kernel_size=3, stride=1, padding=1)   # 3x3 erosion
    contour = (mask - eroded)[:, 0] > 0.5                               # inner boundary
    pos = y.flatten(1)
    anchor_candidates = contour.flatten(1)
    N = pos.shape[0]
    # Same draw as random_sampler (repeated so this function can be copied alone).
    cand = torch.stack([anchor_candidates, pos, ~pos])
    has_any = cand.any(-1)
    weights = torch.where(has_any[..., None], cand, torch.ones_like(cand)).float().flatten(0, 1)
    draw = torch.multinomial(weights, k * m, replacement=True,
                             generator=generator).view(3, N, k * m)
    valid = has_any.all(0)[:, None].expand(N, k)
    # anchor, positive, negative, valid
    return draw[0, :, :k], draw[1].view(N, k, m), draw[2].view(N, k, m), valid


# --------------------------------------------------------------------------------------------------
# Losses (Section III-B-3, Eq. 2-4)
# --------------------------------------------------------------------------------------------------

def metric_loss(feats: torch.Tensor, tuples: tuple, sigma: float = 0.7, beta: float = 0.1,
                eps: float = 0.01, normalize: bool = True, per_anchor: bool = False):
    """Eq. 2: L_metric = sum_n sum_K sum_J sum_M [ ||a - p||^2 - ||a - n||^2 + sigma ]_+   (triplet)
                        + beta * sum_n sum_K sum_J [ ||a - p||^2 - eps ]_+              (pair term)

    How we read what the paper leaves open (also in NOTES.md):
      * Brackets are hinges [x]_+ = max(0, x), as in FaceNet (ref. [24]) whose triplet loss Eq. 2
        follows; without the hinge the triplet term is unbounded below and rewards blowing the
        features apart.
      * The pair term: Eq. 2 prints '+ eps' but the text calls eps "the maximum distance of the
        positive pairs", i.e. a pair is penalised only beyond eps: [d_ap - eps]_+. ('+ eps' inside a
        hinge would be a constant with no gradient.)
      * Features are L2-normalised per voxel over the channel axis first (FaceNet again), so the
        margin sigma has a fixed meaning. conv6d ends in a ReLU, so the unit features are
        non-negative and squared distances lie in [0, 2] (not [0, 4]): sigma = 0.7 asks a negative
        to be 35 % of that range farther than the positive. `normalize=False` uses raw features.
      * Sum, not mean, over tuples and images, as printed; with N = 30, k = 20, m = 1 this gives
        the "large magnitude" that Eq. 4's lambda = 0.01 balances against the cross-entropy.
    Every (positive, negative) combination of an anchor forms a triplet (m*m triplets per anchor).

    tuples: (anchor, positive, negative, valid) as every sampler above returns (see the samplers'
    docstrings). Anchors with valid=False contribute an exact 0 through torch.where, which keeps the
    result attached to the graph (every parameter before the sampling layer still gets a gradient,
    zero), so DistributedDataParallel never sees an unused parameter and no host sync is needed to
    test for an empty batch.

    One gather reads every anchor, positive and negative: its backward allocates a gradient the size
    of the whole feature map, so one gather instead of three is most of this function's cost on a
    CPU. per_anchor=True returns the (N, k) per-anchor terms (zero where invalid) instead of their
    sum."""
    anchor, positive, negative, valid = tuples                          # what every sampler returns
    N, C = feats.shape[:2]
    k, m = positive.shape[1:]
    idx = torch.cat([anchor, positive.flatten(1), negative.flatten(1)], 1)   # (N, k + 2km)
    # (N, C, k + 2km)
    f = feats.flatten(2).gather(2, idx.unsqueeze(1).expand(N, C, -1))
    if normalize:
        f = F.normalize(f, dim=1)
    a = f[..., :k].unsqueeze(-1)                                       # (N, C, k, 1)
    p = f[..., k:k + k * m].reshape(N, C, k, m)
    n = f[..., k + k * m:].reshape(N, C, k, m)
    d_ap = (a - p).pow(2).sum(1)                                       # (N, k, m) squared L2
    d_an = (a - n).pow(2).sum(1)
    triplet = F.relu(d_ap[..., :, None] - d_an[..., None, :] + sigma).sum((-1, -2))   # (N, k)
    pair = F.relu(d_ap - eps).sum(-1)                                                  # (N, k)
    terms = torch.where(valid, triplet + beta * pair, torch.zeros_like(triplet))
    return terms if per_anchor else terms.sum()


@dataclass(frozen=True)
class Config:
    """One row of Table II. `samplers` lists the online sampling strategies (each adds one
    L_metric,t to Eq. 4); `pair_term` switches on Eq. 2's positive-pair term (the 'P' suffix);
    `separate` is R-Sep's gradient routing."""
    name: str
    backbone: str            # 'unet' (Table I) or 'unetpp'
    samplers: tuple = ()     # subset of ('random', 'hard', 'contour')
    pair_term: bool = False
    separate: bool = False
    source: str = "Table II"  # where the paper defines it

    @property
    def uses_metric(self) -> bool:
        return bool(self.samplers)


# Table II, in its row order. Loss columns: every Metric row has the triplet term; 'P' rows add the
# pair term.
CONFIGS = {c.name: c for c in [
    Config("UNet", "unet"),
    Config("UNet++", "unetpp"),
    Config("R-Sep", "unet", ("random",), separate=True),
    Config("R", "unet", ("random",)),
    Config("H", "unet", ("hard",)),
    Config("++H", "unetpp", ("hard",)),
    Config("C", "unet", ("contour",)),
    Config("HR", "unet", ("hard", "random")),
    Config("HC", "unet", ("hard", "contour")),
    Config("HP", "unet", ("hard",), pair_term=True),
    Config("HRP", "unet", ("hard", "random"), pair_term=True),
    Config("HCP", "unet", ("hard", "contour"), pair_term=True),
]}
# Table I's caption and Fig. 4 draw MetricUNet-HCR (hard + contour + random sampling, triplet term
# only), the instantiation Section III-B describes; Table II has no such row, so it stands apart
# from CONFIGS.
OTHER_CONFIGS = {c.name: c for c in [
    Config("HCR", "unet", ("hard", "contour", "random"),
           source="Table I / Fig. 4, not a Table II row"),
]}


def get_config(name: str) -> Config:
    """Table II row by name: 'HCP', 'MetricUNet-HCP', 'metricunet++-h', 'UNet' ...
    (case-insensitive)."""
    norm = lambda s: s.strip().lower().replace("-", "").replace(" (baseline)", "")
    key = norm(name)
    if key.startswith("metricunet") and key != "metricunet":
        key = key[len("metricunet"):]
    for cname, cfg in {**CONFIGS, **OTHER_CONFIGS}.items():
        if norm(cname) == key:
            return cfg
    raise ValueError(f"unknown configuration {name!r}; Table II rows are: {', '.join(CONFIGS)} "
                     f"(and {', '.join(OTHER_CONFIGS)} of Table I / Fig. 4)")


def build_model(config: Config | str, in_channels: int = 3, num_classes: int = 2,
                width: float = 1.0) -> nn.Module:
    """The Stage-2 network for a Table II row. The metric branch adds no weights, so e.g. UNet and
    MetricUNet-HCP have identical parameter counts (Section I)."""
    cfg = get_config(config) if isinstance(config, str) else config
    net = MetricUNetPlusPlus if cfg.backbone == "unetpp" else MetricUNet
    return net(in_channels=in_channels, num_classes=num_classes, width=width)


def sample_tuples(labels: torch.Tensor, logits: torch.Tensor, config: Config,
                  hp: Settings = PAPER_DEFAULTS, generator: torch.Generator | None = None) -> dict:
    """Section III-B-2: each sampling strategy t of the configuration draws its tuples from this
    batch, {t: (anchor, positive, negative, valid)}. Focal-hard sampling reads the heatmap y_hat of
    Eq. 1: the softmax prostate probability of the same forward pass, detached (no gradient flows
    through sampling)."""
    probs = torch.softmax(logits.detach().float(), 1)[:, 1] if "hard" in config.samplers else None
    draw = {"random": lambda: random_sampler(labels, hp.k, hp.m, generator),
            "hard": lambda: focal_hard_negative_sampler(labels, probs, hp.k, hp.m, hp.tau,
                                                        generator, hp.hard_negatives),
            "contour": lambda: contour_aware_sampler(labels, hp.k, hp.m, generator)}
    return {t: draw[t]() for t in config.samplers}


def metric_losses(feats: torch.Tensor, tuples: dict, config: Config,
                  hp: Settings = PAPER_DEFAULTS) -> dict:
    """Eq. 2 for each strategy t: {t: L_metric,t}, with the pair term only in Table II's 'P' rows.

    All strategies' tuples go through one metric_loss call and are summed apart afterwards: one
    gather instead of one per strategy, and the gather's backward is most of the metric module's
    cost on a CPU."""
    if not tuples:                                                          # UNet rows: no term
        return {}
    beta = hp.beta if config.pair_term else 0.0
    joint = tuple(torch.cat(field, 1) for field in zip(*tuples.values()))
    terms = metric_loss(feats.float(), joint, hp.sigma, beta, hp.eps, hp.normalize, per_anchor=True)
    return {t: part.sum() for t, part in zip(tuples, terms.split(hp.k, dim=1))}


def total_loss(logits: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, config: Config,
               hp: Settings = PAPER_DEFAULTS, generator: torch.Generator | None = None):
    """Eq. 4: L = L_CE + lambda * sum_t L_metric,t, one L_metric (Eq. 2) per sampling strategy t.

    Eq. 3's cross-entropy is the mean over all voxels of the batch (torch's default), labels > 0
    being class 1. Returns (loss, parts): parts maps 'ce' and each strategy to its unweighted loss
    tensor. Nothing here syncs with the host. R-Sep: run the model with detach_head_input=True."""
    ce = F.cross_entropy(logits, (labels > 0).long())                       # Eq. 3
    tuples = sample_tuples(labels, logits, config, hp, generator)          # Section III-B-2
    L_metric = metric_losses(feats, tuples, config, hp)                     # Eq. 2, per strategy
    loss = ce
    for L_t in L_metric.values():                                           # Eq. 4
        loss = loss + hp.lam * L_t
    return loss, {"ce": ce, **L_metric}


# -------------------------------------------------------------------- seeing the embedding space
# Section I claims the metric module makes the voxel features "form a discriminate embedding space".
# Two measures of that claim, on features of held-out voxels (conv6d, L2-normalised as in Eq. 2):

def margin_violations(f_anchor: torch.Tensor, f_positive: torch.Tensor, f_negative: torch.Tensor,
                      sigma: float = 0.7) -> float:
    """Share of triplets (rows of three (T, d) feature tensors) that violate Eq. 2's margin,
    ||a - p||^2 - ||a - n||^2 + sigma > 0: what the triplet term still has to push on. 0 means every
    negative lies farther from its anchor than the positive does, by at least sigma."""
    d_ap = (f_anchor - f_positive).pow(2).sum(1)
    d_an = (f_anchor - f_negative).pow(2).sum(1)
    return float((d_ap - d_an + sigma > 0).float().mean())


def fisher_ratio(f_prostate: torch.Tensor, f_background: torch.Tensor) -> float:
    """Separation of two feature clouds ((P, d) and (B, d)): the squared distance between their
    means over the sum of their mean squared spreads around their own means (Fisher's criterion for
    d-dimensional features). Large: two tight, distant clouds; near 0: overlapping ones."""
    mu_p, mu_b = f_prostate.mean(0), f_background.mean(0)
    spread = (f_prostate - mu_p).pow(2).sum(1).mean() + (f_background - mu_b).pow(2).sum(1).mean()
    return float((mu_p - mu_b).pow(2).sum() / spread.clamp_min(1e-12))


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor,
                   smooth: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice of the prostate class over the whole batch ("batch Dice", nnU-Net's default).

    Not in the paper, whose Eq. 3 is cross-entropy alone. Paper is silent on Stage 1's loss; we
    offer cross-entropy + this term for Stage 1 (`train.py --stage1-loss dice_ce`, on in the
    small-data presets). At 1/4 size the prostate is about 1 % of a patch's voxels, and
    cross-entropy alone first settles on "everything is background" (Stage-1 validation DSC 0 for
    the first epochs, or for good); the Dice term is normalised by the prostate's size, so missing
    all of it costs 1 whatever its share of the batch."""
    p = torch.softmax(logits.float(), 1)[:, 1]
    y = (labels > 0).to(p.dtype)
    return 1 - (2 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    """'Poly' decay of Section IV-B: lr = base * (1 - step/total)^power. Paper is silent on the
    power; 0.9 is the value of DeepLab (ref. [13]), where 'poly' comes from."""
    return base_lr * max(0.0, 1.0 - step / max(1, total_steps)) ** power


def row_name(label: str) -> str:
    """Table II's printed names: 'R' -> 'MetricUNet-R', '++H' -> 'MetricUNet++-H', 'UNet' as is."""
    if label in ("UNet", "UNet++"):
        return label
    return f"MetricUNet++-{label[2:]}" if label.startswith("++") else f"MetricUNet-{label}"


# --------------------------------------------------------------------------------------------------
# Checkpoints (written by train.py; read by train.py --resume, infer.py and ablation.py)
# --------------------------------------------------------------------------------------------------

def load_checkpoint(path, device="cpu") -> dict:
    """Our checkpoints hold only tensors and plain Python values (weights, optimiser state, step,
    the run's arguments), so they load with weights_only=True: a file that carries code is refused,
    never executed."""
    return torch.load(path, map_location=device, weights_only=True)
