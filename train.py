"""Train the two-stage MetricUNet (He et al. 2021), then segment and score the test split.

    python train.py --preset cpu                       # README quick start: phantom, both stages, 2-core CPU
    python train.py                                    # the paper's setting (MetricUNet-HCP, Table I, batch 30)
    torchrun --nproc_per_node=4 train.py --config HCP  # the same on 4 GPUs (batch 30 per GPU, Section IV-B)
    python train.py --data ../shared/data/msd-prostate-subset --channel T2 --preset cpu
    python train.py --data DIR --preset cpu --split all --out runs/mine   # every case trains: the model to deploy
    python train.py --preset cpu --resume              # continue a killed run to the same result
    python train.py --preset cpu --paper-strict        # the small preset without anything the paper lacks

What runs, in order (each step names the paper's section):
  1. data: the phantom (generated into ./phantom if --data is not given), preprocessed and cached (Section IV-B),
     split 70/10/20 by seed (Section IV-A);
  2. Stage 1 (Section III-A): the light UNet on 64x64x5 patches of the 1/4-size body image, cross-entropy
     (Eq. 3); then scored on the test split: how far its prostate centre lands from the true one;
  3. Stage 2 (Section III-B): the Table II configuration on 64x64x3 patches of the 128^3 crop around the
     ground-truth centre, loss of Eq. 4, SGD lr 0.01 with poly decay;
  4. infer.py on the test split's NIfTI files, then metrics.py (Table III-style summary).
Additions where the paper is silent, for a handful of scans on a CPU (PAPER_STRICT / SMALL_DATA below, and
the README): an anti-aliased 1/4 down-sampling and a Dice term in Stage 1, patch augmentation in Stage 2.
`--preset paper` and `--paper-strict` run none of them.
Run folder (--out, default runs/<config>-<preset>): args.json, log.csv (per-step losses and per-epoch
validation, the data of Fig. 7), stage{1,2}_last.pt and stage{1,2}_best.pt, stage1_test.csv, predictions/,
test_metrics.csv + .summary.json. Section IV-D's experiments (Tables II-V) run through ablation.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import data
import infer
import metricunet as M
import metrics

# Named presets. 'paper' is Section IV-B; 'cpu' is a small, fast setting for the quick start, never the default.
# Paper is silent on epochs, momentum and weight decay: 'paper' uses 10 + 20 epochs, momentum 0.9, no decay.
PRESETS = {
    "paper": dict(width=1.0, stage1_filters=32, batch=30, patches=500, stage1_patches=500,
                  epochs1=10, epochs2=20, phantom_cases=40),
    "cpu": dict(width=0.25, stage1_filters=16, batch=16, patches=200, stage1_patches=200,
                epochs1=6, epochs2=8, phantom_cases=12),
    # `ablation.py`: 15 Stage-2 runs in about an hour on 2 CPU cores. The ablation runner overrides the
    # patches per image so that every epoch holds the same number of patches whatever the case count.
    "ablation": dict(width=0.25, stage1_filters=16, batch=16, patches=40, stage1_patches=100,
                     epochs1=10, epochs2=6, phantom_cases=20),
}

# Additions where the paper is silent, for training on a handful of scans (README, "Where the paper is
# silent", with their measured effect). These are the paper's values: what `--preset paper` and `--paper-strict`
# (any preset) use. The small-data presets switch on what measurably helps there (SMALL_DATA).
PAPER_STRICT = dict(stage1_antialias=False,   # Section III-A as printed: trilinear at integer positions
                    stage1_loss="ce",         # Eq. 3 in Stage 1 too
                    augment="off",            # Section IV-D: no data augmentation (Stage 2) ...
                    stage1_augment="off",     # ... nor in Stage 1
                    hard_negatives=False,     # Section III-B-2 ii) as printed: negatives drawn from all background
                    metric_warmup=0.0,        # Eq. 4's lambda from the first step
                    fp_patches=0.0,           # Section IV-B: patches "randomly cropped", none mined
                    precise_bn=0)             # BatchNorm's own running averages, as in any PyTorch training
# Switched on for a handful of scans on a CPU, each because it measurably helped there: the anti-aliased 1/4
# size and the Dice term let Stage 1 find the prostate from its first epoch (cross-entropy alone sat at "all
# background" for epochs, on MRI for good); spatial augmentation removed Stage 2's stray blobs (phantom ASD
# 8.9 -> 3.4 mm). Hard negatives, the warm-up and false-positive patches made things worse, and precise BN
# steadied validation without cleaner masks: they stay off (README has the numbers).
SMALL_DATA = dict(stage1_antialias=True, stage1_loss="dice_ce", augment="spatial", stage1_augment="off",
                  hard_negatives=False, metric_warmup=0.0, fp_patches=0.0, precise_bn=0)
for _name in ("cpu", "ablation"):
    PRESETS[_name].update(SMALL_DATA)
PRESETS["paper"].update(PAPER_STRICT)


def parse_args(argv=None):
    """The command line. Defaults are the paper's (Section IV-B, PAPER_DEFAULTS); a preset fills in the sizes
    and the additions it uses, and any flag given explicitly wins over the preset."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="data set folder (Decathlon, nnU-Net or images/+labels/); default: the phantom")
    p.add_argument("--phantom-dir", default="phantom", help="where the phantom is generated when --data is absent")
    p.add_argument("--config", default="HCP", help="Table II row: UNet, UNet++, R-Sep, R, H, ++H, C, HR, HC, HP, HRP, HCP")
    p.add_argument("--stage", default="both", choices=["1", "2", "both"])
    p.add_argument("--preset", default="paper", choices=list(PRESETS))
    p.add_argument("--out", help="run folder (default runs/<config>-<preset>)")
    p.add_argument("--cache", default="data_cache", help="preprocessed-volume cache folder")
    p.add_argument("--channel", default="0", help="channel of 4-D images, by index or name (e.g. T2)")
    # Data and split (Section IV-A). --split-seed is fixed by default, so runs that differ only in --seed are
    # scored on the same test cases. --folds N is leave-one-out (no validation set: the last epoch is kept);
    # --split all trains on every case, with no validation or test: the model you deploy with infer.py.
    p.add_argument("--seed", type=int, default=0, help="weights, patch draws and samplers")
    p.add_argument("--split-seed", type=int, default=0, help="the 70/10/20 split and the phantom (fixed by default)")
    p.add_argument("--folds", type=int, help="cross-validation (no validation set); --folds N = leave-one-out")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--split", default="70/10/20", choices=["70/10/20", "all"], help="all: every case trains")
    p.add_argument("--stage1-from", help="with --stage 2: copy Stage 1 from this run folder (ablation.py)")
    # architecture, batch and schedule (defaults from the preset)
    p.add_argument("--width", type=float, help="Stage-2 width multiplier (1.0 = Table I)")
    p.add_argument("--stage1-filters", type=int, help="Stage-1 filters (Section III-A: 32)")
    p.add_argument("--batch", type=int, help="patches per batch per process (Section IV-B: 30)")
    p.add_argument("--patches", type=int, help="Stage-2 patches per image per epoch (Section IV-B: 500)")
    for flag in ("--stage1-patches", "--epochs1", "--epochs2", "--phantom-cases"):
        p.add_argument(flag, type=int)
    p.add_argument("--fg-fraction", type=float, default=1 / 3, help="share of patches centred on the prostate")
    # Additions where the paper is silent (defaults from the preset; --paper-strict turns them all off). What
    # each does and why: PAPER_STRICT above; what it measurably changed: README, "Additions for small data".
    p.add_argument("--stage1-antialias", action=argparse.BooleanOptionalAction, help="low-pass before 1/4 size")
    p.add_argument("--stage1-loss", choices=["ce", "dice_ce"], help="Stage-1 loss: Eq. 3, or Eq. 3 + soft Dice")
    p.add_argument("--augment", choices=["off", "spatial", "all"], help="Stage-2 patch augmentation (data.AUGMENT)")
    p.add_argument("--stage1-augment", choices=["off", "spatial", "all"], help="the same for Stage 1")
    p.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, help="focal-hard negatives mined too")
    p.add_argument("--metric-warmup", type=float, metavar="EPOCHS", help="Eq. 4's lambda from 0 over EPOCHS epochs")
    p.add_argument("--fp-patches", type=float, metavar="F",
                   help="Stage 2: share of background patches centred on the network's own false positives")
    p.add_argument("--precise-bn", type=int, metavar="BATCHES",
                   help="after each epoch, BatchNorm statistics recomputed over this many training batches")
    p.add_argument("--paper-strict", action="store_true", help="every addition off: the paper as printed")
    # optimisation (Section IV-B) and the metric module (Section III-B, Eq. 1-4)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    for name, v in M.PAPER_DEFAULTS.items():
        p.add_argument(f"--{name}", type=type(v), default=v)
    p.add_argument("--no-normalize", action="store_true", help="Eq. 2 on raw, not L2-normalised, features")
    # running
    p.add_argument("--resume", action="store_true", help="continue from the run folder's *_last.pt checkpoints")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (CPU stays float32)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--log-every", type=int, default=20, help="steps between console progress lines")
    p.add_argument("--no-test", action="store_true", help="skip inference and metrics on the test split")
    p.add_argument("--halt-after-epoch", type=int, help=argparse.SUPPRESS)   # tests: simulate a crash
    args = p.parse_args(argv)
    # sizes, counts and rates must be positive: a zero batch is a user error, reported as one line
    for k in ("width", "stage1_filters", "batch", "patches", "stage1_patches", "epochs1", "epochs2", "phantom_cases",
              "lr"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be > 0, got {getattr(args, k)}")
    if args.fp_patches is not None and not 0 <= args.fp_patches <= 1:
        p.error(f"--fp-patches is a share of the background patches, 0 to 1; got {args.fp_patches}")
    if args.precise_bn is not None and args.precise_bn < 0:
        p.error(f"--precise-bn is a number of batches (0 = off), got {args.precise_bn}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.paper_strict:
        for k, v in PAPER_STRICT.items():
            if getattr(args, k) not in (None, v):
                p.error(f"--paper-strict turns --{k.replace('_', '-')} off; pass one or the other")
            setattr(args, k, v)
    for k, v in {**PAPER_STRICT, **PRESETS[args.preset]}.items():   # an addition a preset does not name is off
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.split == "all" and args.folds or args.stage1_from and args.stage != "2":
        p.error("--split all excludes --folds, and --stage1-from goes with --stage 2")
    try:
        args.config = M.get_config(args.config).name
    except ValueError as e:
        p.error(str(e))
    args.out = args.out or f"runs/{args.config.replace('+', 'p')}-{args.preset}"
    return args


def fmt_time(s):
    return f"{int(s) // 3600}:{int(s) // 60 % 60:02d}:{int(s) % 60:02d}"


# ---------------------------------------------------------------------------------------------- training

def step_loss(stage, logits, feats, labels, cfg, args, generator, progress: float = 1.0):
    """The training loss of one step: Eq. 4 for Stage 2 (Eq. 3 for the UNet rows and for Stage 1), plus, with
    --stage1-loss dice_ce, a soft Dice term in Stage 1 (paper is silent on Stage 1's loss).
    progress: epochs done so far (fractional); with --metric-warmup E, Eq. 4's lambda rises linearly from 0 to
    its value over the first E epochs (paper is silent on schedules; at initialisation lambda * L_metric's
    gradient on the shared layers is ~15x cross-entropy's, so cross-entropy first gets to shape the features)."""
    lam = args.lam * min(1.0, progress / args.metric_warmup) if args.metric_warmup else args.lam
    loss, parts = M.total_loss(logits.float(), feats, labels, cfg, k=args.k, m=args.m, sigma=args.sigma,
                               eps=args.eps, beta=args.beta, lam=lam, tau=args.tau, normalize=not args.no_normalize,
                               generator=generator, hard_negatives=args.hard_negatives)
    if stage == 1 and args.stage1_loss == "dice_ce":
        loss = loss + M.soft_dice_loss(logits, labels)
    return loss, parts


FP_SLICE_STEP = 8   # --fp-patches looks at every 8th axial slice: a blob worth mining spans more than 8 slices


@torch.inference_mode()
def mine_false_positives(model, train_set, device, slice_step: int = FP_SLICE_STEP, amp: bool = False):
    """Paper is silent (an addition, --fp-patches): where does the network call background "prostate" in its
    own training crops? Whole slices, as at test time (eval mode), on every `slice_step`-th slice to keep it cheap
    (about 2 s per 128^3 crop at the cpu preset's width). Returns one (N, 3) array of (x, y, z) per training
    image, for data.PatchDataset.set_fp_voxels. Deterministic: a resumed run mines exactly what it mined before."""
    found = []
    for img, lab in zip(train_set.images, train_set.labels):
        zs = np.arange(0, img.shape[2], slice_step)
        x = data.slices_25d(img, train_set.n_slices)[zs]                  # (Z', n_slices, X', Y')
        pred = np.empty((len(zs), img.shape[0], img.shape[1]), bool)
        for i in range(0, len(zs), 8):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                logits, _ = model(torch.from_numpy(x[i:i + 8]).to(device))
            pred[i:i + 8] = (logits[:, 1] > logits[:, 0]).cpu().numpy()[:, :img.shape[0], :img.shape[1]]
        k, xx, yy = np.nonzero(pred & (lab[:, :, zs].transpose(2, 0, 1) == 0))
        found.append(np.stack([xx, yy, zs[k]], 1))
    return found


@torch.no_grad()
def recompute_bn_statistics(model, loader, batches: int, device):
    """Paper is silent (an addition, --precise-bn; "precise BN", Wu & Johnson 2021, "Rethinking 'Batch' in
    BatchNorm"). BatchNorm keeps an exponential average (momentum 0.1) of the last few batches' statistics, taken
    while the weights were still moving; at this scale it can be far from what the finished weights produce, and
    validation DSC then swings between epochs (0.95 -> 0.27 -> 0.94 on the phantom) with masks full of stray
    blobs. This replaces each BatchNorm's running mean and variance by their plain average over `batches`
    training batches under the current weights. Only the statistics change, never a weight."""
    kinds = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    norms = [m for m in model.modules() if isinstance(m, kinds)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                      # None: a cumulative (equal-weight) average over the batches seen
    was_training = model.training
    model.train()
    for i, (x, _) in enumerate(loader):
        if i == batches:
            break
        model(x.to(device, non_blocking=True))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def train_stage(stage, model, train_set, val_fn, args, ctx, log: metrics.CsvLog | None):
    """One stage: SGD with poly decay (Section IV-B), Eq. 3 (Stage 1) or Eq. 4 (Stage 2), a checkpoint
    every epoch (resumable) and the best by validation DSC kept apart."""
    device, master, ddp = ctx["device"], ctx["master"], ctx["ddp"]
    cfg = M.get_config(args.config) if stage == 2 else M.get_config("UNet")    # Stage 1: Eq. 3 alone
    raw_model = model                          # evaluated and saved; `model` may be its DDP wrapper
    if ddp:                                    # one replica per rank; backward averages the gradients
        model = DDP(model, device_ids=[ctx["local_rank"]] if device.type == "cuda" else None)
    # Section IV-B: "optimized by standard Stochastic Gradient Descent"; momentum 0.9 (paper silent)
    opt = torch.optim.SGD(raw_model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    # Each rank reads its own share of the patch set, so the batch is --batch per process ("30 on each GPU").
    # With augmentation the epoch rides in the index (data.EpochIndexSampler): each epoch a new, seeded draw.
    sampler = DistributedSampler(train_set, num_replicas=ctx["world"], rank=ctx["rank"], shuffle=True,
                                 seed=args.seed, drop_last=True)
    # Worker processes cut (and augment) the next batches while the model trains on this one; persistent
    # workers keep their copy of the volumes between epochs, so no epoch starts by copying them again.
    # --fp-patches changes the data set between epochs, so its workers must start afresh each epoch (they fork
    # from this process and see the new false positives); the epoch then also rides in the index.
    mining = stage == 2 and bool(args.fp_patches)
    per_epoch_draws = train_set.augment != "off" or mining
    loader = DataLoader(train_set, batch_size=args.batch, num_workers=args.workers,
                        sampler=data.EpochIndexSampler(sampler, len(train_set)) if per_epoch_draws else sampler,
                        drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0 and not mining)
    epochs = args.epochs1 if stage == 1 else args.epochs2
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"stage {stage}: fewer patches than one batch; lower --batch or raise --patches")
    total = epochs * steps_per_epoch
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + ctx["rank"])   # the samplers' draws
    start_epoch, best = 0, -1.0
    last, best_path = Path(args.out) / f"stage{stage}_last.pt", Path(args.out) / f"stage{stage}_best.pt"
    if args.resume and last.exists():
        # weights, optimiser momentum and this rank's sampler state: the resumed run continues bit for bit
        ck = M.load_checkpoint(last, device)
        raw_model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"][min(ctx["rank"], len(ck["generator"]) - 1)].cpu())
        start_epoch, best = ck["epoch"] + 1, ck["best_val"]
        if master:
            print(f"stage {stage}: resumed after epoch {start_epoch}/{epochs} from {last}")
    if master:
        log.truncate_after(stage, start_epoch * steps_per_epoch)
    t0, step = time.time(), start_epoch * steps_per_epoch
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        if mining and epoch > 0:               # the network after the last epoch finds its own mistakes
            found = [mine_false_positives(raw_model.eval(), train_set, device, amp=args.amp) if master else None]
            if ddp:
                dist.broadcast_object_list(found, src=0)      # every rank draws from the same list
            train_set.set_fp_voxels(found[0])
            if master:
                print(f"stage {stage} epoch {epoch + 1}: {sum(len(f) for f in found[0])} false-positive voxels "
                      f"mined (every {FP_SLICE_STEP}th slice) for --fp-patches {args.fp_patches:g}")
        model.train()
        buf = []                                   # per-step loss parts, kept on the device until a flush
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = M.poly_lr(args.lr, step, total)         # Section IV-B: "decayed from 0.01 by the 'Poly' method"
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
                logits, feats = model(x, detach_head_input=cfg.separate)
            # Eq. 3 (Stage 1, UNet rows) or Eq. 4 (cross-entropy + lambda * the samplers' Eq. 2 losses)
            loss, parts = step_loss(stage, logits, feats, y, cfg, args, gen, progress=step / steps_per_epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()                        # under DDP: gradients all-reduced (averaged) across ranks here
            opt.step()
            step += 1
            # no .item() here: a host sync per step would stall a GPU; flush() syncs once per log interval
            buf.append((step, lr, torch.stack([loss.detach()] + [parts.get(n, loss.new_zeros(())).detach()
                                                                    for n in ("ce", "random", "hard", "contour")])))
            if step % args.log_every == 0 or step % steps_per_epoch == 0:
                flush(buf, stage, epoch, args, log, master, t0, step, total, start_epoch * steps_per_epoch)
                buf = []
        # End of epoch: the master validates (whole slices, as at test time) and checkpoints; the others wait.
        # Without a validation set (val is NaN: --folds, --split all) the latest epoch is kept as "best".
        if stage == 2 and args.precise_bn:   # each rank its own batches; DDP hands rank 0's to all at the next step
            recompute_bn_statistics(raw_model, loader, args.precise_bn, device)
        model.eval()
        val = val_fn(raw_model) if master else (float("nan"), float("nan"))
        gens = gather_generator_states(gen, ctx)  # a collective: every rank takes part
        if master:
            is_best = math.isnan(val[0]) or val[0] > best
            best = best if math.isnan(val[0]) else max(best, val[0])
            log.write([dict(stage=stage, epoch=epoch + 1, step=step, val_dsc=val[0], val_centre_mm=val[1],
                            seconds=time.time() - t0)])
            print(f"stage {stage} epoch {epoch + 1}/{epochs}: validation DSC {val[0]:.4f}"
                  + (f", centre error {val[1]:.1f} mm" if stage == 1 else "") + (" (best)" if is_best else ""))
            # the checkpoint carries its config, step and data set (nanoGPT-style): enough to resume or infer
            ck = dict(model=raw_model.state_dict(), optimizer=opt.state_dict(), epoch=epoch, step=step,
                      best_val=best, stage=stage, generator=gens, args=vars(args), dataset=ctx["dataset"])
            M.save_checkpoint(ck, last)
            if is_best:
                M.save_checkpoint(ck, best_path)
        if ddp:
            dist.barrier()
        if args.halt_after_epoch is not None and epoch + 1 == args.halt_after_epoch:
            os._exit(3)                                                # simulated crash (tests only)
    return raw_model


def gather_generator_states(gen, ctx):
    """Every rank's sampler-generator state, so a resumed run draws the same tuples (a collective in DDP)."""
    states = [gen.get_state()] * ctx["world"]
    if ctx["ddp"]:
        dist.all_gather_object(states, gen.get_state())
    return states


def flush(buf, stage, epoch, args, log, master, t0, step, total, first_step):
    """One host sync per log interval: write every buffered step to log.csv, stop on a non-finite loss (every
    rank sees its own loss, so every rank stops), and print a progress line with the ETA."""
    vals = torch.stack([b[2] for b in buf]).float().cpu().numpy()
    if not np.all(np.isfinite(vals)):
        bad = buf[int(np.argwhere(~np.isfinite(vals).all(1))[0, 0])][0]
        sys.exit(f"stage {stage}: the loss became NaN or infinite at step {bad}; stopping. The last good "
                 f"checkpoint (end of the previous epoch) is intact in {args.out}; try a lower --lr.")
    if not master:
        return
    log.write([dict(stage=stage, epoch=epoch + 1, step=s, lr=lr, loss=v[0], ce=v[1], random=v[2], hard=v[3],
                    contour=v[4], seconds=time.time() - t0) for (s, lr, _), v in zip(buf, vals)])
    el, v = time.time() - t0, vals.mean(0)
    per_step = el / max(1, step - first_step)
    print(f"stage {stage} step {step}/{total} epoch {epoch + 1}: loss {v[0]:.4f} ce {v[1]:.4f} "
          f"metric r/h/c {v[2]:.2f}/{v[3]:.2f}/{v[4]:.2f}  {per_step:.2f} s/step "
          f"elapsed {fmt_time(el)} eta {fmt_time(per_step * (total - step))}", flush=True)


# ---------------------------------------------------------------------------------------------- run folder
# What a resumed run must share with the run it continues: the networks' shapes and the data they train on.
RESUME_MUST_MATCH = ("config", "width", "stage1_filters", "data", "channel", "split", "split_seed", "folds", "fold")


def check_resume(run: Path, args) -> None:
    """--resume: the run's checkpoints must load and must have been trained with the same architecture and data;
    a mismatch is a one-line error that changes nothing in the run folder."""
    for path in sorted(run.glob("stage*_last.pt")):
        try:
            old = M.load_checkpoint(path)["args"]
        except Exception as e:
            sys.exit(f"error: --resume: {path} is not a valid or trusted checkpoint ({type(e).__name__}); "
                     f"delete it to restart that stage, or choose another --out")
        diff = [f"--{k.replace('_', '-')} {old.get(k)} (now {getattr(args, k)})" for k in RESUME_MUST_MATCH
                if old.get(k) != getattr(args, k) and not (k == "config" and path.name.startswith("stage1"))]
        if diff:
            sys.exit(f"error: --resume: {run} was trained with {', '.join(diff)}; resume with the same flags "
                     f"or start a new --out")


def open_run_folder(run: Path, args, ctx) -> None:
    """The run folder (--out): never inside the input data, never a file, never someone else's finished run
    unless --resume (which must match it); args.json is written atomically only after those checks."""
    for what, path in (("run folder --out", args.out), ("cache --cache", args.cache)):
        if args.data and Path(args.data).resolve() in (Path(path).resolve(), *Path(path).resolve().parents):
            sys.exit(f"error: the {what} {path} lies inside the input data folder {args.data}; choose another")
        if Path(path).exists() and not Path(path).is_dir():
            sys.exit(f"error: the {what} {path} is a file; give a folder")
    if not ctx["master"]:
        return
    try:
        run.mkdir(parents=True, exist_ok=True)
        if not args.resume and any(run.glob("stage*_last.pt")):
            sys.exit(f"error: {run} already holds a run; use --resume to continue it or --out for a new folder")
        if args.resume:
            check_resume(run, args)
        metrics.atomic_write_text(run / "args.json", json.dumps(vars(args), indent=2))
    except OSError as e:
        sys.exit(f"error: cannot write the run folder {run}: {e.strerror}; choose a writable --out")
    what = "Stage 1 (light UNet)" if args.stage == "1" else M.row_name(args.config)
    print(f"{what}, preset {args.preset}, {ctx['world']} process(es) on {ctx['device']}, run {run}")


def copy_stage1(src: Path, run: Path, dataset: dict):
    """--stage1-from: reuse another run's Stage 1 (atomically copied). It must have been trained on this run's
    training cases, or the test cases would leak into it."""
    path = src / "stage1_best.pt"
    if not path.is_file():
        sys.exit(f"error: --stage1-from {src}: no stage1_best.pt there")
    ck = M.load_checkpoint(path)
    if sorted(ck["dataset"]["train"]) != sorted(dataset["train"]) or ck["dataset"]["root"] != dataset["root"]:
        sys.exit(f"error: --stage1-from {src}: its Stage 1 was trained on other cases than this run's training set")
    M.save_checkpoint(ck, run / "stage1_best.pt")


# ---------------------------------------------------------------------------------------------- main

def setup_distributed():
    """The one DDP block: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL on CUDA, gloo on CPU.
    Multi-node works the same: LOCAL_RANK picks this machine's GPU, the global RANK 0 alone writes (run folder,
    phantom, log). Every node needs --data at the same path (or a shared file system); each node's processes
    preprocess into their own --cache if it is not shared."""
    if int(os.environ.get("RANK", -1)) == -1:               # plain `python train.py`: one process
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return dict(ddp=False, rank=0, local_rank=0, world=1, device=device, master=True)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # the cores of this machine are shared by its own processes only (multi-node: not by `world`)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return dict(ddp=True, rank=rank, local_rank=local_rank, world=world, device=device, master=rank == 0)


def prepare_data(args, ctx):
    """The phantom (generated if --data is not given), the split and the preprocessing cache (Section IV-B):
    the master does the writing, the other ranks wait for it (data.load_split)."""
    root = Path(args.data) if args.data else Path(args.phantom_dir)
    if ctx["master"] and args.data is None and not (root / "dataset.json").exists():
        print(f"generating the synthetic pelvic-CT phantom ({args.phantom_cases} cases) in {root}/")
        data.make_phantom(root, cases=args.phantom_cases, seed=args.split_seed)
    if ctx["ddp"]:
        dist.barrier()
    cases, preps, (tr, va, te) = data.load_split(root, args.channel, args.cache, args.split, args.split_seed,
                                                 args.fold if args.folds else None, args.folds, ctx["master"],
                                                 dist.barrier if ctx["ddp"] else None)
    ctx["dataset"] = dict(root=str(root.resolve()), cases=[c.name for c in cases], train=tr, val=va, test=te,
                          channel=str(args.channel))
    return cases, preps, tr, va, te


def main(argv=None):
    """Parse, set up DDP, then the four steps of the module docstring: data, Stage 1, Stage 2, test split."""
    args = parse_args(argv)
    ctx = setup_distributed()
    device, master = ctx["device"], ctx["master"]
    # Seeds: a run is deterministic in --seed. Each rank gets its own stream for anything drawn at random
    # outside the data set and samplers (which are seeded by index); the weights are re-seeded identically.
    torch.manual_seed(args.seed + ctx["rank"])
    np.random.seed(args.seed + ctx["rank"])
    run = Path(args.out)
    open_run_folder(run, args, ctx)
    try:
        cases, preps, tr, va, te = prepare_data(args, ctx)
    except (ValueError, FileExistsError) as e:              # data.DataError is a ValueError, as are bad --folds
        sys.exit(f"error: {e}")
    log = metrics.CsvLog(run / "log.csv", args.resume) if master else None
    t_start = time.time()

    if args.stage in ("1", "both"):
        # Section III-A: the light UNet on 64x64x5 patches of the 1/4-size body image
        pairs = {n: data.stage1_pair(preps[n], antialias=args.stage1_antialias) for n in tr + va}
        train_set = data.PatchDataset([pairs[n][0] for n in tr], [pairs[n][1] for n in tr], patch=64, n_slices=5,
                                      patches_per_image=args.stage1_patches, fg_fraction=args.fg_fraction,
                                      seed=args.seed, augment=args.stage1_augment)
        torch.manual_seed(args.seed)                   # identical initial weights on every rank
        model = M.LightUNet(in_channels=5, filters=args.stage1_filters).to(device)
        train_stage(1, model, train_set, lambda m: infer.validate_stage1(m, [pairs[n] for n in va], device, args.amp),
                    args, ctx, log)
        if master and te:                              # Stage 1's own job on unseen cases: find the prostate
            model.load_state_dict(M.load_checkpoint(run / "stage1_best.pt", device)["model"])
            infer.score_stage1(model.eval(), preps, te, device, args.stage1_antialias, run / "stage1_test.csv")

    if args.stage1_from and master:
        copy_stage1(Path(args.stage1_from), run, ctx["dataset"])
    if args.stage in ("2", "both"):
        # Section III-B: 64x64x3 patches of the 128^3 crop; in training the crop is centred on the ground truth
        crops = {n: data.prostate_crop(preps[n]) for n in tr + va}
        train_set = data.PatchDataset([crops[n][0] for n in tr], [crops[n][1] for n in tr], patch=64, n_slices=3,
                                      patches_per_image=args.patches, fg_fraction=args.fg_fraction, seed=args.seed,
                                      augment=args.augment, fp_fraction=args.fp_patches)
        torch.manual_seed(args.seed)
        model = M.build_model(args.config, in_channels=3, width=args.width).to(device)
        if master:
            print(f"stage 2: {M.row_name(args.config)}, {M.count_parameters(model) / 1e6:.3f} M parameters")
        train_stage(2, model, train_set, lambda m: infer.validate_stage2(m, [crops[n] for n in va], device, args.amp),
                    args, ctx, log)

    if master:
        print(f"training done in {fmt_time(time.time() - t_start)}")
    if master and args.stage != "1" and (run / "stage1_best.pt").exists() and not args.no_test and te:
        # the test split through infer.py and metrics.py, exactly as a user would run them
        infer.score_test_split(run, [c for c in cases if c.name in te], args.channel, device,
                               f"\n{M.row_name(args.config)} on the test split ({len(te)} cases)",
                               extra={"config": args.config, "preset": args.preset})
        print(f"\nper-case metrics: {run / 'test_metrics.csv'}; total time {fmt_time(time.time() - t_start)}")
    if ctx["ddp"]:
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1:2] == ["ablation"]:
        sys.exit("the ablation moved: python ablation.py (same flags)")
    main()
