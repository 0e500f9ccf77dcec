"""Train the two-stage MetricUNet (He et al., Medical Image Analysis 2021), then segment and score
the test split.

    python train.py --preset cpu                        # the quick start: phantom, both stages, CPU
    python train.py                                     # the paper's setting (HCP, Table I)
    torchrun --nproc_per_node=4 train.py                # the same on 4 GPUs (batch 30 per GPU)
    python train.py --data Task05_Prostate --channel T2 --preset cpu   # your data (Decathlon)
    python train.py --data DIR --preset cpu --split all --out runs/mine   # the model to deploy
    python train.py --preset cpu --resume               # continue a killed run to the same result
    python train.py --preset cpu --paper-strict         # without anything the paper lacks

What runs, in order (each step names the paper's section):
  1. data: the phantom (phantom.py, generated into ./phantom if --data is not given), preprocessed
     and
     cached (Section IV-B), split 70/10/20 (Section IV-A);
  2. Stage 1 (Section III-A): the light UNet on 64x64x5 patches of the 1/4-size body image, Eq. 3;
     then
     scored on the test split: how far the prostate centre it finds lies from the true one;
  3. Stage 2 (Section III-B): a Table II configuration on 64x64x3 patches of the 128^3 crop around
     the
     prostate, Eq. 4, SGD from lr 0.01 with poly decay (Section IV-B);
  4. infer.py on the test split's NIfTI files, then metrics.py (a Table III-style summary).
Run folder (--out, default runs/<config>-<preset>): args.json, log.csv (per-step losses and
per-epoch validation: Fig. 7's data), stage{1,2}_last.pt and stage{1,2}_best.pt, stage1_test.csv,
predictions/, test_metrics.csv and its .summary.json. Section IV-D's experiments run through
ablation.py. """
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import sys
import time
from datetime import timedelta
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
import phantom

# ----------------------------------------------------------------------------------------- settings
# Additions where the paper is silent, for training on a handful of scans (NOTES.md has what each
# did). These are their values as the paper has it: what `--paper-strict` forces, and what any
# preset that does not name an addition gets.
PAPER_STRICT = dict(stage1_antialias=False,   # Section III-A: trilinear 1/4 size, no low-pass
                    stage1_loss="ce",         # Eq. 3 in Stage 1 too
                    augment="off",            # Section IV-D: "we avoid ... data augmentation"
                    hard_negatives=False,     # Section III-B-2 ii) as printed
                    native_slices=False,      # Section III-B: adjacent slices of the 1-mm volume
                    stage2_loss="ce",         # Eq. 4: cross-entropy and the metric term
                    postprocess="off")        # the paper reports raw masks
# Named presets: 'paper' is Section IV-B (paper is silent on epochs: 10 + 20); 'cpu' is the quick
# start on a 2-core CPU; 'cpu-mri' the same for MRI with 3-4 mm slices; 'ablation' is ablation.py's
# (15 Stage-2 runs in an hour). Each line shows every addition its preset turns on: the anti-aliased
# 1/4 size and the Dice term let Stage 1 find the prostate from its first epoch, spatial
# augmentation removed most of Stage 2's stray blobs, keeping the central piece (decided on held-out
# masks) the rest; on MRI, the scan's own slices as 2.5D neighbours, Dice in Stage 2 and a longer
# Stage 2 (results/README.md, section 7).
PRESETS = {
    "paper": dict(width=1.0, stage1_filters=32, batch=30, patches=500, stage1_patches=500,
                  epochs1=10, epochs2=20, phantom_cases=40),
    "cpu": dict(width=0.25, stage1_filters=16, batch=16, patches=200, stage1_patches=200,
                epochs1=6, epochs2=8, phantom_cases=12,
                stage1_antialias=True, stage1_loss="dice_ce", augment="spatial",
                postprocess="decide"),
    "cpu-mri": dict(width=0.25, stage1_filters=16, batch=16, patches=200, stage1_patches=200,
                    epochs1=6, epochs2=20, phantom_cases=12,
                    stage1_antialias=True, stage1_loss="dice_ce", augment="spatial",
                    postprocess="decide", native_slices=True, stage2_loss="dice_ce"),
    "ablation": dict(width=0.25, stage1_filters=16, batch=16, patches=40, stage1_patches=100,
                     epochs1=10, epochs2=6, phantom_cases=20,
                     stage1_antialias=True, stage1_loss="dice_ce", augment="spatial"),
}


def parse_args(argv=None):
    """The command line: the paper's settings, the run, and the additions for small data. Defaults
    are the paper's; sizes come from the preset (resolve_settings)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the paper's settings (Sections III-IV; defaults as printed)")
    g.add_argument("--config", default="HCP", help="Table II row: UNet, UNet++, R-Sep, R, H, ++H, "
                   "C, HR, HC, HP, HRP, HCP (or HCR of Table I)")
    g.add_argument("--preset", default="paper", choices=list(PRESETS), help="sizes and additions")
    g.add_argument("--width", type=positive(float), help="Stage-2 width multiplier (Table I = 1.0)")
    g.add_argument("--stage1-filters", type=positive(int),
                   help="Stage-1 filters (Section III-A: 32)")
    g.add_argument("--batch", type=positive(int), help="patches per batch per process (IV-B: 30)")
    g.add_argument("--patches", type=positive(int), help="Stage-2 patches per image (IV-B: 500)")
    g.add_argument("--stage1-patches", type=positive(int), help="Stage-1 patches per image")
    g.add_argument("--epochs1", type=positive(int), help="Stage-1 epochs (paper is silent)")
    g.add_argument("--epochs2", type=positive(int), help="Stage-2 epochs (paper is silent)")
    g.add_argument("--lr", type=positive(float), default=0.01,
                   help="SGD learning rate (IV-B: 0.01)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper is silent)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="SGD weight decay (paper is silent)")
    d = M.PAPER_DEFAULTS
    g.add_argument("--k", type=positive(int), default=d.k,
                   help="anchors per image (III-B-2, Table V: 20)")
    g.add_argument("--m", type=positive(int), default=d.m,
                   help="positives and negatives per anchor (1)")
    g.add_argument("--sigma", type=float, default=d.sigma,
                   help="triplet margin (Eq. 2, Fig. 6: 0.7)")
    g.add_argument("--eps", type=float, default=d.eps, help="positive-pair distance (Eq. 2: 0.01)")
    g.add_argument("--beta", type=float, default=d.beta, help="pair-term weight (Eq. 2: 0.1)")
    g.add_argument("--lam", type=float, default=d.lam, help="metric-loss weight (Eq. 4: 0.01)")
    g.add_argument("--tau", type=float, default=d.tau, help="focal-hard threshold (Eq. 1: 0.1)")
    g.add_argument("--no-normalize", action="store_true", help="Eq. 2 on raw features (paper is "
                   "silent; default: L2-normalised, as FaceNet)")
    g.add_argument("--fg-fraction", type=float, default=1 / 3, help="share of patches centred on "
                   "the prostate (paper is silent; nnU-Net's 1/3)")
    g = p.add_argument_group("the run")
    g.add_argument("--data", help="data set folder (Decathlon, nnU-Net or images/ + labels/); "
                   "default: the synthetic phantom")
    g.add_argument("--phantom-dir", default="phantom", help="where the phantom is generated")
    g.add_argument("--phantom-cases", type=positive(int),
                   help="phantom size (default: the preset's)")
    g.add_argument("--channel", default="0",
                   help="channel of 4-D images, by index or name (e.g. T2)")
    g.add_argument("--stage", default="both", choices=["1", "2", "both"],
                   help="which stage to train")
    g.add_argument("--out", help="run folder (default runs/<config>-<preset>)")
    g.add_argument("--cache", default="data_cache", help="preprocessed-volume cache folder")
    g.add_argument("--seed", type=int, default=0, help="weights, patch draws and samplers")
    g.add_argument("--split-seed", type=int, default=0, help="the split and the phantom (fixed, so "
                   "runs that differ in --seed are scored on the same cases)")
    g.add_argument("--split", default="70/10/20", choices=["70/10/20", "all"],
                   help="all: every case trains, nothing is held out (the model to deploy)")
    g.add_argument("--folds", type=int, help="K-fold cross-validation, no validation set (K = "
                   "cases: leave-one-out)")
    g.add_argument("--fold", type=int, default=0, help="which fold is the test set")
    g.add_argument("--stage1-from", help="with --stage 2: copy Stage 1 from this run folder")
    g.add_argument("--resume", action="store_true", help="continue from the run's *_last.pt")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (CPU stays float32)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per process")
    g.add_argument("--log-every", type=positive(int), default=20,
                   help="steps between progress lines")
    g.add_argument("--no-test", action="store_true",
                   help="skip inference and metrics on the test split")
    g = p.add_argument_group("additions for small data (paper is silent; on in the cpu and "
                             "ablation presets; NOTES.md)")
    g.add_argument("--stage1-antialias", action=argparse.BooleanOptionalAction,
                   help="Gaussian low-pass before Stage 1's 1/4-size down-sampling")
    g.add_argument("--stage1-loss", choices=["ce", "dice_ce"],
                   help="Stage 1: Eq. 3, or Eq. 3 + soft Dice")
    g.add_argument("--augment", choices=["off", "spatial", "all"],
                   help="Stage-2 patch augmentation")
    g.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction,
                   help="focal-hard sampling mines false positives as negatives (other reading)")
    g.add_argument("--native-slices", action=argparse.BooleanOptionalAction,
                   help="Stage 2's 2.5D neighbours one of the scan's own slices apart, not 1 mm")
    g.add_argument("--stage2-loss", choices=["ce", "dice_ce"],
                   help="Stage 2: Eq. 4, or Eq. 4 + soft Dice")
    g.add_argument("--postprocess", choices=["off", "decide"],
                   help="decide: keep one piece of each mask if that does not lower the "
                   "held-out DSC (validation split, or --postprocess-from); infer.py applies it")
    g.add_argument("--postprocess-from", nargs="+", metavar="RUN",
                   help="with --postprocess decide: cross-validation runs (--folds) whose "
                   "held-out masks decide (for --split all)")
    g.add_argument("--paper-strict", action="store_true",
                   help="every addition off: the paper as printed")
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.split == "all" and args.folds or args.stage1_from and args.stage != "2":
        p.error("--split all excludes --folds, and --stage1-from goes with --stage 2")
    try:
        args.config = M.get_config(args.config).name
    except ValueError as e:
        p.error(str(e))
    resolve_settings(args, p)
    if args.postprocess_from and args.postprocess != "decide":
        p.error("--postprocess-from needs --postprocess decide (--paper-strict and the paper "
                "preset keep the raw masks)")
    args.out = args.out or f"runs/{args.config.replace('+', 'p')}-{args.preset}"
    return args


def positive(kind):
    """argparse type for sizes, counts and rates: a zero batch is a one-line error, not a
    traceback."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def resolve_settings(args, parser) -> None:
    """The one place a run's settings are decided: a flag given on the command line wins, then
    --paper-strict (every addition at the paper's value), then the preset; an addition the preset
    does not name is off. Contradictions (--paper-strict --augment spatial) are a one-line error."""
    for key, value in {**PAPER_STRICT, **PRESETS[args.preset]}.items():
        given = getattr(args, key)
        if args.paper_strict and key in PAPER_STRICT:
            if given not in (None, PAPER_STRICT[key]):
                flag = "--" + key.replace("_", "-")
                parser.error(f"--paper-strict turns {flag} off; pass one or the other")
            value = PAPER_STRICT[key]
        setattr(args, key, value if given is None else given)


def metric_settings(args) -> M.Settings:
    """The metric module's hyper-parameters of this run, as one object (Eq. 1-4)."""
    return M.Settings(k=args.k, m=args.m, sigma=args.sigma, eps=args.eps, beta=args.beta,
                      lam=args.lam, tau=args.tau, normalize=not args.no_normalize,
                      hard_negatives=args.hard_negatives)


def fmt_time(s):
    return f"{int(s) // 3600}:{int(s) // 60 % 60:02d}:{int(s) % 60:02d}"


# ----------------------------------------------------------------------------------------- training

def step_loss(logits, feats, labels, cfg, hp, generator, dice: bool = False):
    """One step's loss: Eq. 4 (Eq. 3 alone for the UNet rows and for Stage 1). dice=True adds a soft
    Dice term (--stage1-loss / --stage2-loss dice_ce; paper is silent on Stage 1's loss)."""
    loss, parts = M.total_loss(logits.float(), feats, labels, cfg, hp, generator)
    if dice:
        loss = loss + M.soft_dice_loss(logits, labels)
    return loss, parts


def adds_dice(stage: int, args) -> bool:
    """Whether a stage's loss gets step_loss's soft Dice term (--stage1-loss, --stage2-loss)."""
    return (args.stage1_loss if stage == 1 else args.stage2_loss) == "dice_ce"


def train_stage(stage, model, train_set, validate, args, ctx, log):
    """One stage: SGD with poly decay (Section IV-B) on Eq. 3 (Stage 1) or Eq. 4 (Stage 2), a
    checkpoint after every epoch (resumable), the best by validation DSC kept apart. validate: None
    without a validation set (--folds, --split all): the last epoch is kept."""
    device, master = ctx["device"], ctx["master"]
    cfg = M.get_config(args.config if stage == 2 else "UNet")       # Stage 1: Eq. 3 alone
    hp, dice = metric_settings(args), adds_dice(stage, args)
    loader, sampler = make_loader(stage, train_set, args, ctx)
    # Section IV-B: "optimized by standard Stochastic Gradient Descent" (momentum: paper is silent)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay)
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + ctx["rank"])  # samplers
    epochs = args.epochs1 if stage == 1 else args.epochs2
    start_epoch, best = resume_stage(stage, epochs, model, opt, gen, args, ctx)
    net = model                  # DDP: one replica per rank, rank 0's weights broadcast at the wrap
    if ctx["ddp"]:
        net = DDP(model, device_ids=[ctx["local_rank"]] if device.type == "cuda" else None)
    steps_per_epoch = len(loader)
    total, step = epochs * steps_per_epoch, start_epoch * steps_per_epoch
    if master:
        log.truncate_after(stage, start_epoch)
        if validate is None and start_epoch == 0:
            print(f"stage {stage}: no validation split (--split all or --folds): the last epoch is "
                  f"kept")
    t0 = time.time()
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        net.train()
        buf = []                     # per-step loss parts, kept on the device until a flush
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = M.poly_lr(args.lr, step, total)     # Section IV-B: decayed by the 'Poly' method
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast("cuda", torch.bfloat16, enabled=args.amp and device.type == "cuda"):
                logits, feats = net(x, detach_head_input=cfg.separate)
            loss, parts = step_loss(logits, feats, y, cfg, hp, gen, dice)   # Eq. 3 or Eq. 4
            opt.zero_grad(set_to_none=True)
            loss.backward()          # under DDP: gradients all-reduced (averaged) here
            opt.step()
            step += 1
            # no .item() here: a host sync per step would stall a GPU; flush() syncs once in a while
            buf.append((step, lr, torch.stack([loss.detach()] + [parts.get(
                n, loss.new_zeros(())).detach() for n in ("ce", "random", "hard", "contour")])))
            if step % args.log_every == 0 or step % steps_per_epoch == 0:
                flush(buf, stage, epoch, args, log, master, t0, step, total,
                      start_epoch * steps_per_epoch)
                buf = []
        best = end_of_epoch(stage, epoch, epochs, step, model, opt, gen, best, validate, args,
                            ctx, log, t0)
    return model


def make_loader(stage, train_set, args, ctx):
    """The patch loader. Each rank reads its own share of the patch set, so the batch is --batch per
    process ("30 on each GPU"). With augmentation the epoch rides in the index
    (data.EpochIndexSampler): a new, seeded draw each epoch. Worker processes cut (and augment) the
    next batches while the model trains on this one; persistent workers keep their copy of the
    volumes between epochs."""
    sampler = DistributedSampler(train_set, num_replicas=ctx["world"], rank=ctx["rank"],
                                 shuffle=True, seed=args.seed, drop_last=True)
    if train_set.augment != "off":
        sampler_or_epochs = data.EpochIndexSampler(sampler, len(train_set))
    else:
        sampler_or_epochs = sampler
    loader = DataLoader(train_set, batch_size=args.batch, num_workers=args.workers,
                        sampler=sampler_or_epochs, drop_last=True,
                        pin_memory=ctx["device"].type == "cuda",
                        persistent_workers=args.workers > 0)
    if len(loader) == 0:
        raise SystemExit(f"stage {stage}: fewer patches than one batch; lower --batch or raise "
                         f"--patches")
    return loader, sampler


def resume_stage(stage, epochs, model, opt, gen, args, ctx):
    """--resume: weights, optimiser momentum and this rank's sampler state from stage{N}_last.pt,
    loaded before the DDP wrap, so the resumed run continues bit for bit. Decided once: rank 0 reads
    its checkpoint (only it writes the run folder) and hands it to every rank, so all ranks continue
    from the same epoch. Returns (first epoch, best validation)."""
    last = Path(args.out) / f"stage{stage}_last.pt"
    ck = M.load_checkpoint(last) if ctx["master"] and args.resume and last.exists() else None
    if ctx["ddp"]:
        box = [ck]
        dist.broadcast_object_list(box, src=0, group=ctx["slow"])
        ck = box[0]
    if ck is None:
        return 0, -1.0
    if len(ck["generator"]) != ctx["world"]:            # every rank sees this, so all stop
        sys.exit(f"error: --resume: {last} was written by {len(ck['generator'])} process(es), this "
                 f"run has {ctx['world']}; resume with the same number of processes")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    gen.set_state(ck["generator"][ctx["rank"]].cpu())
    if ctx["master"]:
        print(f"stage {stage}: resumed after epoch {ck['epoch'] + 1}/{epochs} from {last}")
    return ck["epoch"] + 1, ck["best_val"]


def end_of_epoch(stage, epoch, epochs, step, model, opt, gen, best, validate, args, ctx, log, t0):
    """The master validates (whole slices, as at test time), logs and writes the checkpoints; every
    rank hands in its sampler state (a collective) and waits for the master. Without a validation
    set every epoch is "best", so the last one is kept. Returns the best validation DSC so far."""
    model.eval()
    val = validate(model) if ctx["master"] and validate else (float("nan"), float("nan"))
    gens = gather_generator_states(gen, ctx)        # waits for the master's validation (slow group)
    if ctx["master"]:
        is_best = math.isnan(val[0]) or val[0] > best
        best = best if math.isnan(val[0]) else max(best, val[0])
        log.write([dict(stage=stage, epoch=epoch + 1, step=step, val_dsc=val[0],
                        val_centre_mm=val[1], seconds=time.time() - t0)])
        line = f"stage {stage} epoch {epoch + 1}/{epochs}"
        if validate is None:
            print(f"{line} done")
        else:
            centre = f", centre error {val[1]:.1f} mm" if stage == 1 else ""
            print(f"{line}: validation DSC {val[0]:.4f}{centre}" + (" (best)" if is_best else ""))
        # the checkpoint carries its config, step and data set (nanoGPT-style): enough to resume
        ck = dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch, step=step,
                  best_val=best, stage=stage, generator=gens, args=vars(args),
                  dataset=ctx["dataset"])
        save_checkpoint(ck, Path(args.out) / f"stage{stage}_last.pt")
        if is_best:
            save_checkpoint(ck, Path(args.out) / f"stage{stage}_best.pt")
    wait_for_all(ctx)
    return best


def gather_generator_states(gen, ctx):
    """Every rank's sampler-generator state, so a resumed run draws the same tuples (a collective in
    DDP). The samplers draw from one generator per rank, seeded by the rank, so each rank's state is
    kept: a resumed rank r continues its own stream."""
    states = [gen.get_state()] * ctx["world"]
    if ctx["ddp"]:
        dist.all_gather_object(states, gen.get_state(), group=ctx["slow"])
    return states


def flush(buf, stage, epoch, args, log, master, t0, step, total, first_step):
    """One host sync per log interval: write every buffered step to log.csv, stop on a non-finite
    loss (every rank sees its own loss, so every rank stops), and print a progress line with the
    ETA."""
    vals = torch.stack([b[2] for b in buf]).float().cpu().numpy()
    if not np.all(np.isfinite(vals)):
        bad = buf[int(np.argwhere(~np.isfinite(vals).all(1))[0, 0])][0]
        sys.exit(f"stage {stage}: the loss became NaN or infinite at step {bad}; stopping. The "
                 f"last good "
                 f"checkpoint (end of the previous epoch) is intact in {args.out}; try a lower "
                 f"--lr.")
    if not master:
        return
    log.write([dict(stage=stage, epoch=epoch + 1, step=s, lr=lr, loss=v[0], ce=v[1], random=v[2],
                    hard=v[3],
                    contour=v[4], seconds=time.time() - t0) for (s, lr, _), v in zip(buf, vals)])
    el, v = time.time() - t0, vals.mean(0)
    per_step = el / max(1, step - first_step)
    print(f"stage {stage} step {step}/{total} epoch {epoch + 1}: loss {v[0]:.4f} ce {v[1]:.4f} "
          f"metric r/h/c {v[2]:.2f}/{v[3]:.2f}/{v[4]:.2f}  {per_step:.2f} s/step elapsed "
          f"{fmt_time(el)} eta {fmt_time(per_step * (total - step))}", flush=True)


# --------------------------------------------------------------------------------------- validation
# What training measures, with the inference path a user runs (infer.predict_volume: whole slices,
# no patch voting, as at test time): validation after every epoch, Stage 1 on the test split, and
# the test split end to end through infer.py and metrics.py.

def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice similarity coefficient (Eq. 5) of two boolean arrays; 1 when both are empty."""
    s = pred.sum() + gt.sum()
    return 1.0 if s == 0 else 2.0 * float(np.logical_and(pred, gt).sum()) / float(s)


def validate_stage1(model, pairs, device, amp=False):
    """Stage-1 validation (Section III-A): mean DSC on the 1/4-size images, and the mean distance in
    mm between the centroids of prediction and label (what the crop depends on); NaN if nothing was
    found."""
    dscs, errs = [], []
    for img, lab in pairs:
        pred = infer.predict_volume(model, img, 5, device, amp=amp) > 0.5
        dscs.append(dice(pred, lab > 0))
        if pred.any():
            shift = np.argwhere(pred).mean(0) - np.argwhere(lab).mean(0)
            errs.append(np.linalg.norm(shift * data.STAGE1_FACTOR))
    return float(np.mean(dscs)), float(np.mean(errs)) if errs else float("nan")


def validate_stage2(model, crops, steps, device, amp=False):
    """Stage-2 validation DSC on the 128^3 crops around the ground-truth centre (Section III-B),
    each crop's 2.5D neighbours `steps` apart (data.native_slice_step); Stage 2 has no centre error
    (NaN)."""
    dscs = [dice(infer.predict_volume(model, img, 3, device, amp=amp, step=step) > 0.5,
                 lab > 0) for (img, lab), step in zip(crops, steps)]
    return float(np.mean(dscs)), float("nan")


def score_stage1(model, preps: dict, names, device, antialias: bool, csv_path: Path) -> list[dict]:
    """Stage 1 on the test split (Section III-A's job: find the prostate): DSC at 1/4 size, and the
    error in mm of the centre that inference uses (infer.stage1_centre) against the ground-truth
    centroid; NaN if Stage 1 found nothing. Folds have no validation set, so a leave-one-out Stage 1
    is judged here."""
    rows = []
    for n in names:
        img1, lab1 = data.stage1_pair(preps[n], antialias=antialias)
        prob = infer.predict_volume(model, img1, 5, device)
        c = infer.stage1_centre(prob)
        truth = data.label_centre(preps[n].label)
        err = float("nan") if c is None else float(np.linalg.norm(c - truth))
        rows.append(dict(case=n, dsc_quarter=dice(prob > 0.5, lab1 > 0), centre_error_mm=err))
        print(f"stage 1 on test case {n}: DSC {rows[-1]['dsc_quarter']:.4f} at 1/4 size, centre "
              f"error "
              + (f"{err:.1f} mm" if c is not None else "- (no prostate found)"))
    metrics.write_csv(csv_path, rows)
    return rows


def score_test_split(run_dir: Path, test_cases, channel, device, title: str, extra: dict) -> dict:
    """A finished run on its test split, as a user would score it: infer.run writes the masks into
    run_dir/predictions (the run's own folder, so a resumed run may replace them), then metrics.py's
    evaluation against the labels -> run_dir/test_metrics.csv and its summary (Table III layout)."""
    pred_dir = Path(run_dir) / "predictions"
    infer.run(run_dir, [(c.name, c.image, c.channel) for c in test_cases], pred_dir, device=device,
              overwrite=True)
    rows = metrics.evaluate_folders(pred_dir, Path(test_cases[0].label).parent,
                                    only=[c.name for c in test_cases])
    summary = metrics.write_report(rows, Path(run_dir) / "test_metrics.csv", extra=extra)
    print(metrics.format_summary(summary, title))
    return summary


# ---------------------------------------------------------------------------------- post-processing
# Paper is silent (it reports raw masks). A few training scans leave stray pieces on the obturator
# muscles and the bladder wall; nnU-Net decides on its cross-validation whether to keep one piece
# of each mask, and so does --postprocess decide: on the validation split, or on the held-out masks
# of --folds runs (--postprocess-from). The piece kept is the one at the prostate centre
# (infer.keep_one_piece). The decision goes to the run folder; infer.py applies it
# (infer.run_postprocessing).

def one_piece_decision(evidence: list[dict]) -> bool:
    """nnU-Net's rule (Isensee et al., Nature Methods 2021): keep one piece when the held-out
    masks' mean DSC with it is at least their mean DSC without it."""
    if not evidence:
        return False
    return bool(np.mean([r["dsc_one_piece"] for r in evidence])
                >= np.mean([r["dsc_raw"] for r in evidence]))


def held_out_evidence(run: Path, preps, names, device) -> list[dict]:
    """The finished run on held-out cases (infer.segment, raw): per case the pieces of the mask and
    the DSC of the raw mask and of its piece at the prostate centre against the label, on the 1-mm
    grid."""
    stage1, stage2, targs = infer.load_models(run, device)
    rows = []
    for n in names:
        prob, centre = infer.segment(preps[n], stage1, stage2, device, log=lambda *_: None,
                                     stage1_antialias=bool(targs.get("stage1_antialias")),
                                     native_slices=bool(targs.get("native_slices")))
        raw, lab = prob > 0.5, preps[n].label > 0
        rows.append(dict(case=n, pieces=data.pieces(raw), dsc_raw=dice(raw, lab),
                         dsc_one_piece=dice(data.central_piece(raw, centre), lab)))
    return rows


def pooled_evidence(runs) -> list[dict]:
    """--postprocess-from: the held-out evidence of finished cross-validation runs, pooled; a run
    without it is a one-line error (checked before training starts)."""
    rows = []
    for run in runs:
        path = Path(run) / infer.POSTPROCESSING
        try:
            rows += json.loads(path.read_text())["evidence"]
        except (OSError, ValueError, KeyError, TypeError):
            sys.exit(f"error: --postprocess-from {run}: no held-out evidence in {path}; give "
                     f"finished train.py --folds runs trained with --postprocess decide")
    return rows


def decide_postprocessing(run: Path, args, preps, va, te, device) -> None:
    """--postprocess decide: gather the evidence (validation split; or the test fold of a --folds
    run, kept for pooling and not used on itself; or --postprocess-from), apply
    one_piece_decision, and write it with its evidence to run/postprocessing.json."""
    decision = None
    if args.postprocess_from:
        evidence = pooled_evidence(args.postprocess_from)
        where = f"{len(evidence)} held-out masks of {len(args.postprocess_from)} runs"
        decision = one_piece_decision(evidence)
    elif va:
        evidence, where = held_out_evidence(run, preps, va, device), "the validation split"
        decision = one_piece_decision(evidence)
    elif args.folds:                   # evidence for pooling, never a decision on its own test case
        evidence = held_out_evidence(run, preps, te, device)
        where = f"test fold {args.fold} (pool the folds with --postprocess-from to decide)"
    else:
        evidence, where = [], "nothing held out (--split all): pass --postprocess-from to decide"
    result = dict(one_piece=decision, decided_on=where, evidence=evidence,
                  rule="keep the piece at the prostate centre when the mean held-out DSC does "
                       "not drop")
    data.atomic_write_text(run / infer.POSTPROCESSING, json.dumps(result, indent=2))
    if evidence:
        raw = np.mean([r["dsc_raw"] for r in evidence])
        one = np.mean([r["dsc_one_piece"] for r in evidence])
        pieces = np.mean([r["pieces"] for r in evidence])
        print(f"post-processing on {where}: {pieces:.1f} pieces per mask; mean DSC raw "
              f"{raw:.4f}, one piece {one:.4f}"
              + ("" if decision is None else
                 f" -> {'keep one piece' if decision else 'raw masks'}"))
    else:
        print(f"post-processing: {where}; masks stay raw")


# --------------------------------------------------------------------------------------- run folder
# What a resumed run must share with the run it continues: the networks' shapes, the data, and every
# setting that decides the training path (so a resumed run ends where the uninterrupted one would).
RESUME_MUST_MATCH = ("config", "width", "stage1_filters", "data", "channel", "split", "split_seed",
                     "folds", "fold", "batch", "patches", "stage1_patches", "epochs1", "epochs2",
                     "lr", "momentum", "weight_decay", "seed", "k", "m", "sigma", "eps", "beta",
                     "lam", "tau", "no_normalize", "fg_fraction", "stage1_antialias",
                     "stage1_loss", "augment", "hard_negatives", "native_slices",
                     "stage2_loss")


def save_checkpoint(obj: dict, path) -> None:
    """Atomically (data.atomic_write): a crash mid-write never leaves half a file where the last
    good checkpoint was, so --resume always has one. Only tensors and plain values:
    M.load_checkpoint reads it with weights_only=True."""
    data.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_resume(run: Path, args) -> None:
    """--resume: the run's checkpoints must load and must have been trained with the same
    architecture and data; a mismatch is a one-line error that changes nothing in the run folder."""
    for path in sorted(run.glob("stage*_last.pt")):
        try:
            old = M.load_checkpoint(path)["args"]
        except Exception as e:
            sys.exit(f"error: --resume: {path} is not a valid or trusted checkpoint "
                     f"({type(e).__name__}); delete it to restart that stage, or choose another "
                     f"--out")
        stage1 = path.name.startswith("stage1")             # Stage 1 is the same for every config
        diff = [f"--{k.replace('_', '-')} {old.get(k)} (now {getattr(args, k)})"
                for k in RESUME_MUST_MATCH
                if old.get(k) != getattr(args, k) and not (k == "config" and stage1)]
        if diff:
            sys.exit(f"error: --resume: {run} was trained with {', '.join(diff)}; resume with the "
                     f"same flags or start a new --out")


def open_run_folder(run: Path, args, ctx) -> None:
    """The run folder (--out): never inside the input data, never a file, never someone else's
    finished run unless --resume (which must match it); args.json is written only after those
    checks."""
    for what, path in (("run folder --out", args.out), ("cache --cache", args.cache)):
        if args.data and Path(args.data).resolve() in (Path(path).resolve(),
                                                       *Path(path).resolve().parents):
            sys.exit(f"error: the {what} {path} lies inside the input data folder {args.data}; "
                     f"choose another")
        if Path(path).exists() and not Path(path).is_dir():
            sys.exit(f"error: the {what} {path} is a file; give a folder")
    if not ctx["master"]:
        return
    try:
        run.mkdir(parents=True, exist_ok=True)
        if not args.resume and any(run.glob("stage*_last.pt")):
            sys.exit(f"error: {run} already holds a run; use --resume to continue it or --out for "
                     f"a new folder")
        if args.resume:
            check_resume(run, args)
        data.atomic_write_text(run / "args.json", json.dumps(vars(args), indent=2))
    except OSError as e:
        sys.exit(f"error: cannot write the run folder {run}: {e.strerror}; choose a writable --out")
    what = "Stage 1 (light UNet)" if args.stage == "1" else M.row_name(args.config)
    print(f"{what}, preset {args.preset}, {ctx['world']} process(es) on {ctx['device']}, batch "
          f"{args.batch} per process ({args.batch * ctx['world']} per step), run {run}")


def copy_stage1(src: Path, run: Path, dataset: dict):
    """--stage1-from: reuse another run's Stage 1 (copied atomically). It must have been trained on
    this run's training cases, or the test cases would leak into it."""
    path = src / "stage1_best.pt"
    if not path.is_file():
        sys.exit(f"error: --stage1-from {src}: no stage1_best.pt there")
    try:
        ck = M.load_checkpoint(path)
        theirs = ck["dataset"]
    except Exception as e:      # truncated, garbage, foreign or code-carrying files all end here
        sys.exit(f"error: --stage1-from {path} is not a valid or trusted train.py checkpoint "
                 f"({type(e).__name__}); train Stage 1 again or give another run folder")
    if sorted(theirs["train"]) != sorted(dataset["train"]) or theirs["root"] != dataset["root"]:
        sys.exit(f"error: --stage1-from {src}: its Stage 1 was trained on other cases than this "
                 f"run's training set")
    save_checkpoint(ck, run / "stage1_best.pt")


# --------------------------------------------------------------------------------------------- main
# The DDP rule, decided here once: a rank waits on another rank's long local work (data preparation,
# the master's validation and test split) only through ctx["slow"], a gloo group whose timeout is
# SLOW_WAIT. The default group, with the backend's own timeout (NCCL's is 10 minutes), carries only
# what waits on a training step: DDP's gradient all-reduce and its start-up broadcast.
SLOW_WAIT = timedelta(hours=24)


def setup_distributed():
    """The one DDP block: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL on CUDA, gloo on CPU.
    Multi-node works with node-local disks and with a shared one: each node prepares the data it
    needs (prepare_data), the global rank 0 alone writes the run folder, and it hands a resumed
    checkpoint to every rank (resume_stage).

    What Eq. 4 means under DDP: each process sums Eq. 2 over its own batch (--batch, 30 in the
    paper) and DDP averages the gradients over processes, so lambda weighs the metric term against
    the cross-entropy of one GPU's batch, whatever the number of GPUs ("30 on each GPU")."""
    if int(os.environ.get("RANK", -1)) == -1:               # plain `python train.py`: one process
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return dict(ddp=False, rank=0, local_rank=0, local_world=1, world=1, device=device,
                    master=True)
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus < local_world:                  # every rank of the node sees this, so all stop
        sys.exit(f"error: {local_world} processes on this node but {gpus} visible GPU(s); use "
                 f"torchrun --nproc_per_node={gpus} (or CUDA_VISIBLE_DEVICES= for CPU processes)")
    dist.init_process_group(backend="nccl" if gpus else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    slow = dist.new_group(backend="gloo", timeout=SLOW_WAIT)
    if gpus:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # the cores of this machine are shared by its own processes only (not by `world`)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return dict(ddp=True, rank=rank, local_rank=local_rank, local_world=local_world, world=world,
                device=device, master=rank == 0, slow=slow)


def wait_for_all(ctx) -> None:
    """A barrier for long local work (ctx["slow"], SLOW_WAIT): no rank times out while another
    prepares data or scores the test split."""
    if ctx["ddp"]:
        dist.barrier(group=ctx["slow"])


def on_every_rank(ctx, fn, *args):
    """fn(*args) on this rank. If it stops with a one-line error on any rank (a missing --data on
    one node, a run folder the master refuses), every rank stops with that message at once, rather
    than waiting for the one that left until a timeout. Returns fn's result."""
    try:
        result, error = fn(*args), None
    except SystemExit as e:
        result, error = None, str(e.code)
    except (ValueError, OSError) as e:                  # data.DataError is a ValueError
        result, error = None, f"error: {e}"
    if ctx["ddp"]:
        errors = [None] * ctx["world"]
        dist.all_gather_object(errors, error, group=ctx["slow"])
        error = next((f"{e} (rank {r})" for r, e in enumerate(errors) if e), None)
    if error:
        sys.exit(error)
    return result


def make_phantom_once(root: Path, cases: int, seed: int) -> None:
    """The phantom, made by each node's local rank 0 (node-local disks each need their own; it is
    deterministic in --split-seed, so all copies are the same). On a shared disk the nodes race:
    each writes its own temporary folder and renames it into place; a later one removes its copy."""
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty; the phantom is only written to "
                              f"a new folder (or give --data)")
    print(f"generating the synthetic pelvic-CT phantom ({cases} cases) in {root}/")
    tmp = root.parent / f".{root.name}.{socket.gethostname()}.{os.getpid()}.tmp"
    phantom.make_phantom(tmp, cases=cases, seed=seed)
    try:
        os.rename(tmp, root)
    except OSError:                                     # another node was first: same data
        shutil.rmtree(tmp)


def prepare_data(args, ctx):
    """The phantom (generated if --data is not given), the split and the preprocessing cache
    (Section IV-B). Every node prepares what it needs: its ranks preprocess a share of the cases
    each into --cache (node-local or shared: writes are atomic), then wait for each other on the
    slow group. All ranks must see the same data set (case list and split), or all stop."""
    root = Path(args.data) if args.data else Path(args.phantom_dir)
    if args.data is None:
        make = ctx["local_rank"] == 0 and not (root / "dataset.json").exists()
        on_every_rank(ctx, make_phantom_once if make else lambda *_: None, root, args.phantom_cases,
                      args.split_seed)
    wait_for_all(ctx)
    fold = args.fold if args.folds else None
    cases, (tr, va, te) = on_every_rank(ctx, data.list_and_split, root, args.channel, args.split,
                                        args.split_seed, fold, args.folds)
    seen = [c.name for c in cases], tr, va, te
    if ctx["ddp"]:
        views = [None] * ctx["world"]
        dist.all_gather_object(views, seen, group=ctx["slow"])
        odd = next((r for r, v in enumerate(views) if v != views[0]), None)
        if odd is not None:                             # every rank has every view: all stop
            sys.exit(f"error: rank {odd} sees another data set or split than rank 0 in {root} "
                     f"({len(views[odd][0])} vs {len(views[0][0])} cases); give every node the "
                     f"same --data")
    if ctx["master"]:
        how = f"fold {args.fold} of {args.folds}" if args.folds else args.split
        print(f"data {root}: {len(cases)} cases, split {how} train {len(tr)} / val {len(va)} / "
              f"test {len(te)} (split seed {args.split_seed})")
    # This node's ranks split the work by local rank: node-local caches are each filled by their
    # node; with a shared one, ranks of equal local rank on two nodes may write the same file,
    # atomically, with the same bytes (wasted work, never a half-written file).
    share = cases[ctx["local_rank"]::ctx["local_world"]]
    on_every_rank(ctx, data.prepare_cases, share, args.cache, True,
                  print if ctx["local_rank"] == 0 else None)
    wait_for_all(ctx)
    ctx["dataset"] = dict(root=str(root.resolve()), cases=[c.name for c in cases], train=tr, val=va,
                          test=te, channel=str(args.channel))
    return cases, data.CachedCases(cases, args.cache), tr, va, te


def main(argv=None):
    """Parse, set up DDP, then the module docstring's four steps: data, Stage 1, Stage 2, test."""
    args = parse_args(argv)
    ctx = setup_distributed()
    device, master = ctx["device"], ctx["master"]
    # Seeds: a run is deterministic in --seed. Each rank gets its own stream for anything drawn at
    # random outside the data set and samplers (which are seeded by index); the weights are
    # re-seeded identically.
    torch.manual_seed(args.seed + ctx["rank"])
    np.random.seed(args.seed + ctx["rank"])
    if device.type == "cuda":          # fixed 64x64 patches: cuDNN may pick its fastest kernels
        torch.backends.cudnn.benchmark = True
    run = Path(args.out)
    # A bad --data, --channel or --folds is refused before the run folder is made (listing the cases
    # is cheap: a user who mistyped a path must not find an empty run folder behind), and on every
    # rank at once: a path that one node lacks stops all nodes, quickly.
    if args.data:
        fold = args.fold if args.folds else None
        on_every_rank(ctx, data.list_and_split, args.data, args.channel, args.split,
                      args.split_seed, fold, args.folds)
    if args.postprocess_from:                     # before training, not after it
        pooled_evidence(args.postprocess_from)
    on_every_rank(ctx, open_run_folder, run, args, ctx)
    cases, preps, tr, va, te = prepare_data(args, ctx)
    log = metrics.CsvLog(run / "log.csv", args.resume) if master else None
    t_start = time.time()

    if args.stage in ("1", "both"):
        # Section III-A: the light UNet on 64x64x5 patches of the 1/4-size body image
        pairs = {n: data.stage1_pair(preps[n], antialias=args.stage1_antialias) for n in tr + va}
        train_set = data.PatchDataset([pairs[n][0] for n in tr], [pairs[n][1] for n in tr],
                                      patch=64, n_slices=5, patches_per_image=args.stage1_patches,
                                      fg_fraction=args.fg_fraction, seed=args.seed)
        torch.manual_seed(args.seed)                   # identical initial weights on every rank
        model = M.LightUNet(in_channels=5, filters=args.stage1_filters).to(device)
        val_pairs = [pairs[n] for n in va]
        validate = (lambda m: validate_stage1(m, val_pairs, device, args.amp)) if va else None
        train_stage(1, model, train_set, validate, args, ctx, log)
        if master and te:                     # Stage 1's own job on unseen cases: find the prostate
            model.load_state_dict(M.load_checkpoint(run / "stage1_best.pt", device)["model"])
            score_stage1(model.eval(), preps, te, device, args.stage1_antialias,
                         run / "stage1_test.csv")
        wait_for_all(ctx)                               # the others wait for the master's scoring

    if args.stage1_from:
        src = Path(args.stage1_from)
        on_every_rank(ctx, lambda: master and copy_stage1(src, run, ctx["dataset"]))
    if args.stage in ("2", "both"):
        # Section III-B: 64x64x3 patches of the 128^3 crop, in training centred on the label
        crops = {n: data.prostate_crop(preps[n]) for n in tr + va}
        steps = {n: data.native_slice_step(preps[n], args.native_slices) for n in tr + va}
        train_set = data.PatchDataset([crops[n][0] for n in tr], [crops[n][1] for n in tr],
                                      patch=64, n_slices=3, patches_per_image=args.patches,
                                      fg_fraction=args.fg_fraction, seed=args.seed,
                                      augment=args.augment, steps=[steps[n] for n in tr])
        torch.manual_seed(args.seed)
        model = M.build_model(args.config, in_channels=3, width=args.width).to(device)
        if master:
            n_params = M.count_parameters(model) / 1e6
            print(f"stage 2: {M.row_name(args.config)}, {n_params:.3f} M parameters")
        val_crops, val_steps = [crops[n] for n in va], [steps[n] for n in va]
        validate = (lambda m: validate_stage2(m, val_crops, val_steps, device, args.amp)) if va \
            else None
        train_stage(2, model, train_set, validate, args, ctx, log)

    if master:
        print(f"training done in {fmt_time(time.time() - t_start)}")
    has_stage1 = (run / "stage1_best.pt").exists()
    if master and args.stage != "1" and not has_stage1 and not args.no_test and te:
        print(f"no Stage 1 in {run} (train it with --stage 1 or both, or pass --stage1-from): the "
              f"test split is not segmented")
    if master and args.stage != "1" and has_stage1 and args.postprocess == "decide":
        decide_postprocessing(run, args, preps, va, te, device)
    if master and args.stage != "1" and has_stage1 and not args.no_test and te:
        # the test split through infer.py and metrics.py, exactly as a user would run them
        score_test_split(run, [c for c in cases if c.name in te], args.channel, device,
                         f"\n{M.row_name(args.config)} on the test split ({len(te)} cases)",
                         extra={"config": args.config, "preset": args.preset})
        print(f"\nper-case metrics: {run / 'test_metrics.csv'}; total time "
              f"{fmt_time(time.time() - t_start)}")
    if ctx["ddp"]:
        wait_for_all(ctx)                 # the other ranks wait for the test split, then all leave
        dist.destroy_process_group()


if __name__ == "__main__":
    data.run_command(main, "every checkpoint written is complete; --resume continues from the "
                           "last finished epoch")
