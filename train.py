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
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import data
import metricunet as M
import metrics
from infer import predict_volume

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
                    metric_warmup=0.0)        # Eq. 4's lambda from the first step
SMALL_DATA = dict(stage1_antialias=True, stage1_loss="dice_ce", augment="spatial", stage1_augment="off",
                  hard_negatives=False, metric_warmup=0.0)
for _name in ("cpu", "ablation"):
    PRESETS[_name].update(SMALL_DATA)
PRESETS["paper"].update(PAPER_STRICT)


def positive(kind):
    """argparse type: a number > 0 (a zero or negative batch, width, epoch count ... is a user error)."""
    def check(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return check


def non_negative_int(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="data set folder (Decathlon, nnU-Net or images/+labels/); default: the phantom")
    p.add_argument("--phantom-dir", default="phantom", help="where the phantom is generated when --data is absent")
    p.add_argument("--config", default="HCP", help="Table II row: UNet, UNet++, R-Sep, R, H, ++H, C, HR, HC, HP, HRP, HCP")
    p.add_argument("--stage", default="both", choices=["1", "2", "both"])
    p.add_argument("--preset", default="paper", choices=list(PRESETS))
    p.add_argument("--out", help="run folder (default runs/<config>-<preset>)")
    p.add_argument("--cache", default="data_cache", help="preprocessed-volume cache folder")
    p.add_argument("--channel", default="0", help="channel of 4-D images, by index or name (e.g. T2)")
    p.add_argument("--seed", type=int, default=0, help="weights, patch draws and samplers")
    p.add_argument("--split-seed", type=int, default=0,
                   help="the 70/10/20 split (and the phantom); fixed by default so runs that differ only in --seed "
                        "are scored on the same test cases")
    p.add_argument("--folds", type=int, help="cross-validation instead of 70/10/20: test on fold --fold of "
                                             "--folds, no validation set (last epoch kept); --folds N = leave-one-out")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--stage1-from", help="with --stage 2: copy Stage 1 from this run folder (the ablation shares one "
                                         "Stage 1 between Table II rows, as the paper's ablation varies Stage 2 only)")
    # architecture / batch (defaults from the preset)
    p.add_argument("--width", type=positive(float), help="Stage-2 width multiplier (1.0 = Table I)")
    p.add_argument("--stage1-filters", type=positive(int), help="Stage-1 filters (Section III-A: 32)")
    p.add_argument("--batch", type=positive(int), help="patches per batch per process (Section IV-B: 30)")
    p.add_argument("--patches", type=positive(int), help="Stage-2 patches per image per epoch (Section IV-B: 500)")
    p.add_argument("--stage1-patches", type=positive(int), help="Stage-1 patches per image per epoch")
    p.add_argument("--epochs1", type=positive(int))
    p.add_argument("--epochs2", type=positive(int))
    p.add_argument("--phantom-cases", type=positive(int))
    p.add_argument("--fg-fraction", type=float, default=1 / 3, help="share of patches centred on the prostate")
    p.add_argument("--split", default="70/10/20", choices=["70/10/20", "all"],
                   help="'all': train on every case of --data, no validation or test (the last epoch is kept), "
                        "for the model you deploy with infer.py")
    # additions where the paper is silent (defaults from the preset; --paper-strict turns them all off)
    p.add_argument("--stage1-antialias", action=argparse.BooleanOptionalAction,
                   help="Gaussian low-pass before the 1/4 down-sampling (data.stage1_volume)")
    p.add_argument("--stage1-loss", choices=["ce", "dice_ce"], help="Stage-1 loss: Eq. 3, or Eq. 3 + soft Dice")
    p.add_argument("--augment", choices=["off", "spatial", "all"],
                   help="on-the-fly augmentation of Stage 2's patches (data.AUGMENT): flips, rotations, zoom; "
                        "'all' adds intensity changes (for MRI; CT's Hounsfield units are calibrated)")
    p.add_argument("--stage1-augment", choices=["off", "spatial", "all"],
                   help="the same for Stage 1 (off in the small-data presets: it slowed Stage 1's first epoch)")
    p.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction,
                   help="focal-hard tuples also mine false positives as negatives (metricunet.focal_hard_negative_sampler)")
    p.add_argument("--metric-warmup", type=float, metavar="EPOCHS",
                   help="raise Eq. 4's lambda linearly from 0 over the first EPOCHS epochs of Stage 2 (0: off)")
    p.add_argument("--paper-strict", action="store_true",
                   help="the paper as printed: every addition where the paper is silent off, in any preset")
    # optimisation (Section IV-B) and the metric module (Section III-B, Eq. 1-4)
    p.add_argument("--lr", type=positive(float), default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    for name, v in M.PAPER_DEFAULTS.items():
        p.add_argument(f"--{name}", type=type(v), default=v)
    p.add_argument("--no-normalize", action="store_true", help="Eq. 2 on raw, not L2-normalised, features")
    # running
    p.add_argument("--resume", action="store_true", help="continue from the run folder's *_last.pt checkpoints")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (CPU stays float32)")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers per process")
    p.add_argument("--log-every", type=int, default=20, help="steps between console progress lines")
    p.add_argument("--no-test", action="store_true", help="skip inference and metrics on the test split")
    p.add_argument("--halt-after-epoch", type=int, help=argparse.SUPPRESS)   # tests: simulate a crash
    args = p.parse_args(argv)
    if args.paper_strict:
        for k, v in PAPER_STRICT.items():
            if getattr(args, k) not in (None, v):
                p.error(f"--paper-strict turns --{k.replace('_', '-')} off; pass one or the other")
            setattr(args, k, v)
    for k, v in {**PAPER_STRICT, **PRESETS[args.preset]}.items():   # an addition a preset does not name is off
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.split == "all" and args.folds:
        p.error("--split all and --folds exclude each other")
    try:
        args.config = M.get_config(args.config).name
    except ValueError as e:
        p.error(str(e))
    if args.stage1_from and args.stage != "2":
        p.error("--stage1-from goes with --stage 2")
    args.out = args.out or f"runs/{args.config.replace('+', 'p')}-{args.preset}"
    return args


# ---------------------------------------------------------------------------------------------- helpers

def atomic_torch_save(obj, path: Path):
    """Checkpoint written to a temporary file and moved into place: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o644)                   # mkstemp makes 0600; reports and checkpoints are shared
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path: Path, device="cpu"):
    """Checkpoints hold only tensors and plain Python values, so weights_only=True (no pickle code runs)."""
    return torch.load(path, map_location=device, weights_only=True)


class EpochIndexSampler(torch.utils.data.Sampler):
    """The DistributedSampler's indices plus epoch * len(dataset): PatchDataset reads such an index as the same
    patch with that epoch's augmentation. The epoch travels inside the index, so persistent DataLoader
    workers (which hold their own copy of the dataset) need no shared state, and a resumed run draws alike."""

    def __init__(self, sampler: DistributedSampler, n: int):
        self.sampler, self.n = sampler, n

    def __iter__(self):
        return (self.sampler.epoch * self.n + i for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


class CsvLog:
    """Append-only CSV of per-step losses and per-epoch validation (Fig. 7's curves); master process only."""
    FIELDS = ["stage", "epoch", "step", "lr", "loss", "ce", "random", "hard", "contour", "val_dsc", "val_centre_mm",
              "seconds"]

    def __init__(self, path: Path, resume: bool):
        self.path = path
        if not (resume and path.exists()):
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)

    def truncate_after(self, stage: int, step: int) -> None:
        """At the start of a stage: drop that stage's rows logged after its last checkpoint (`step`; 0 when it
        starts afresh), so the steps between a checkpoint and a kill are not in the log twice after --resume
        (Fig. 7's curves and the training time read this log)."""
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["stage"]) != stage or int(r["step"]) <= step]
        if len(keep) != len(rows):
            buf = io.StringIO()
            w = csv.DictWriter(buf, self.FIELDS)
            w.writeheader()
            w.writerows(keep)
            metrics.atomic_write_text(self.path, buf.getvalue())

    def write(self, rows):
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.FIELDS)
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------- validation

def dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def validate_stage1(model, vols, device, amp):
    """Stage-1 validation: DSC on the 1/4-size image and the error of the predicted centre in mm."""
    if not vols:                                     # cross-validation folds have no validation set
        return float("nan"), float("nan")
    dscs, errs = [], []
    for img, lab in vols:
        pred = predict_volume(model, img, 5, device, amp=amp) > 0.5
        dscs.append(dice(pred, lab > 0))
        if pred.any():
            errs.append(np.linalg.norm((np.argwhere(pred).mean(0) - np.argwhere(lab).mean(0)) * data.STAGE1_FACTOR))
        else:
            errs.append(float("nan"))
    return float(np.mean(dscs)), float(np.nanmean(errs)) if np.any(np.isfinite(errs)) else float("nan")


def score_stage1(model, preps, names, args, device, run: Path) -> list[dict]:
    """Stage 1 on the test split (Section III-A's job: find the prostate): DSC at 1/4 size, and the error in mm
    of the centre that inference uses (infer.stage1_centre, largest component) against the ground-truth
    centroid; NaN if Stage 1 found nothing. Written to stage1_test.csv; cross-validation folds have no
    validation set, so this is where a leave-one-out Stage 1 is judged."""
    import infer
    rows = []
    for n in names:
        img1, lab1 = data.stage1_pair(preps[n], antialias=args.stage1_antialias)
        prob = predict_volume(model, img1, 5, device)
        c = infer.stage1_centre(prob)
        err = float("nan") if c is None else float(np.linalg.norm(c - data.label_centre(preps[n].label)))
        rows.append(dict(case=n, dsc_quarter=float(dice(prob > 0.5, lab1 > 0)), centre_error_mm=err))
        print(f"stage 1 on test case {n}: DSC {rows[-1]['dsc_quarter']:.4f} at 1/4 size, centre error "
              + (f"{err:.1f} mm" if c is not None else "- (no prostate found)"))
    write_csv(run / "stage1_test.csv", rows)
    return rows


def validate_stage2(model, crops, device, amp):
    """Stage-2 validation DSC on the 128^3 crops around the ground-truth centre (no centre error: NaN)."""
    if not crops:
        return float("nan"), float("nan")
    dscs = [dice(predict_volume(model, img, 3, device, amp=amp) > 0.5, lab > 0) for img, lab in crops]
    return float(np.mean(dscs)), float("nan")


# ---------------------------------------------------------------------------------------------- training

def step_loss(stage, logits, feats, labels, cfg, args, generator, progress: float = 1.0):
    """The training loss of one step: Eq. 4 for Stage 2 (Eq. 3 for the UNet rows and for Stage 1), plus, with
    --stage1-loss dice_ce, a soft Dice term in Stage 1 (paper is silent on Stage 1's loss).
    progress: epochs done so far (fractional); with --metric-warmup E, Eq. 4's lambda rises linearly from 0 to
    its value over the first E epochs (paper is silent on schedules; at initialisation lambda * L_metric's
    gradient on the shared layers is ~15x cross-entropy's, so cross-entropy first gets to shape the features)."""
    lam = args.lam * min(1.0, progress / args.metric_warmup) if args.metric_warmup else args.lam
    loss, parts = M.total_loss(logits.float(), feats, labels, cfg, k=args.k, m=args.m, sigma=args.sigma,
                               eps=args.eps, beta=args.beta, lam=lam, tau=args.tau,
                               normalize=not args.no_normalize, generator=generator,
                               hard_negatives=args.hard_negatives)
    if stage == 1 and args.stage1_loss == "dice_ce":
        loss = loss + M.soft_dice_loss(logits, labels)
    return loss, parts


def train_stage(stage, model, train_set, val_fn, args, ctx, log: CsvLog | None):
    """One stage: SGD with poly decay (Section IV-B), Eq. 3 (Stage 1) or Eq. 4 (Stage 2), a checkpoint
    every epoch (resumable) and the best by validation DSC kept apart."""
    device, master, ddp = ctx["device"], ctx["master"], ctx["ddp"]
    run = Path(args.out)
    cfg = M.get_config(args.config) if stage == 2 else M.get_config("UNet")
    raw_model = model                          # evaluated and saved; `model` may be its DDP wrapper
    if ddp:                                    # one replica per rank; backward averages the gradients
        model = DDP(model, device_ids=[ctx["local_rank"]] if device.type == "cuda" else None)
    # Section IV-B: "optimized by standard Stochastic Gradient Descent"; momentum 0.9 (paper silent)
    opt = torch.optim.SGD(raw_model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    # each rank reads its own share of the patch set, so the batch is --batch per process ("30 on each GPU")
    sampler = DistributedSampler(train_set, num_replicas=ctx["world"], rank=ctx["rank"], shuffle=True,
                                 seed=args.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=args.batch, num_workers=args.workers,
                        sampler=EpochIndexSampler(sampler, len(train_set)) if train_set.augment != "off" else sampler,
                        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    epochs = args.epochs1 if stage == 1 else args.epochs2
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"stage {stage}: fewer patches than one batch; lower --batch or raise --patches")
    total = epochs * steps_per_epoch
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + ctx["rank"])   # the samplers' draws
    start_epoch, best = 0, -1.0
    last, best_path = run / f"stage{stage}_last.pt", run / f"stage{stage}_best.pt"
    if args.resume and last.exists():
        ck = load_checkpoint(last, device)
        raw_model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"][min(ctx["rank"], len(ck["generator"]) - 1)].cpu())
        start_epoch, best = ck["epoch"] + 1, ck["best_val"]
        if master:
            print(f"stage {stage}: resumed after epoch {ck['epoch'] + 1}/{epochs} from {last}")
    if master:
        log.truncate_after(stage, start_epoch * steps_per_epoch)
    t0, step = time.time(), start_epoch * steps_per_epoch
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
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
            loss.backward()
            opt.step()
            step += 1
            buf.append((step, lr, torch.stack([loss.detach()] + [parts.get(n, loss.new_zeros(()))
                                                                    .detach() for n in ("ce", "random", "hard", "contour")])))
            if step % args.log_every == 0 or step % steps_per_epoch == 0:
                flush(buf, stage, epoch, args, log, master, t0, step, total, start_epoch * steps_per_epoch)
                buf = []
        # end of epoch: the master validates (whole slices, as at test time) and checkpoints; the others wait
        model.eval()
        val = val_fn(raw_model) if master else (float("nan"), float("nan"))
        if master:
            # no validation set (NaN): the latest epoch is the one kept as "best"
            is_best = math.isnan(val[0]) or val[0] > best
            best = best if math.isnan(val[0]) else max(best, val[0])
            log.write([dict(stage=stage, epoch=epoch + 1, step=step, val_dsc=val[0], val_centre_mm=val[1],
                            seconds=time.time() - t0)])
            print(f"stage {stage} epoch {epoch + 1}/{epochs}: validation DSC {val[0]:.4f}"
                  + (f", centre error {val[1]:.1f} mm" if stage == 1 else "") + (" (best)" if is_best else ""))
            gens = gather_generator_states(gen, ctx)
            ck = dict(model=raw_model.state_dict(), optimizer=opt.state_dict(), epoch=epoch, step=step,
                      best_val=best, stage=stage, generator=gens, args=vars(args), dataset=ctx["dataset"])
            atomic_torch_save(ck, last)
            if is_best:
                atomic_torch_save(ck, best_path)
        else:
            gather_generator_states(gen, ctx)
        if ddp:
            dist.barrier()
        if args.halt_after_epoch is not None and epoch + 1 == args.halt_after_epoch:
            os._exit(3)                                                # simulated crash (tests only)
    return raw_model


# what a resumed run must share with the run it continues: the networks' shapes and the data they train on
RESUME_MUST_MATCH = ("config", "width", "stage1_filters", "data", "channel", "split", "split_seed", "folds", "fold")


def check_resume(run: Path, args) -> None:
    """--resume: the run's checkpoints must load and must have been trained with the same architecture and data;
    a mismatch is a one-line error that changes nothing in the run folder."""
    for path in sorted(run.glob("stage*_last.pt")):
        try:
            old = load_checkpoint(path)["args"]
        except Exception as e:
            sys.exit(f"error: --resume: {path} is not a valid or trusted checkpoint ({type(e).__name__}); "
                     f"delete it to restart that stage, or choose another --out")
        diff = [f"--{k.replace('_', '-')} {old.get(k)} (now {getattr(args, k)})" for k in RESUME_MUST_MATCH
                if old.get(k) != getattr(args, k) and not (k == "config" and path.name.startswith("stage1"))]
        if diff:
            sys.exit(f"error: --resume: {run} was trained with {', '.join(diff)}; resume with the same flags "
                     f"or start a new --out")


def copy_stage1(src: Path, run: Path, dataset: dict):
    """--stage1-from: reuse another run's Stage 1 (atomically copied). It must have been trained on this run's
    training cases, or the test cases would leak into it."""
    path = src / "stage1_best.pt"
    if not path.is_file():
        sys.exit(f"error: --stage1-from {src}: no stage1_best.pt there")
    ck = load_checkpoint(path)
    if sorted(ck["dataset"]["train"]) != sorted(dataset["train"]) or ck["dataset"]["root"] != dataset["root"]:
        sys.exit(f"error: --stage1-from {src}: its Stage 1 was trained on other cases than this run's training set")
    atomic_torch_save(ck, run / "stage1_best.pt")


def gather_generator_states(gen, ctx):
    """Every rank's sampler-generator state, so a resumed run draws the same tuples (a collective in DDP)."""
    state = gen.get_state()
    if not ctx["ddp"]:
        return [state]
    states = [None] * ctx["world"]
    dist.all_gather_object(states, state)
    return states


def flush(buf, stage, epoch, args, log, master, t0, step, total, first_step):
    """One host sync per log interval: write every buffered step to the CSV, stop on a non-finite loss, and
    print a progress line with the ETA."""
    if not buf:
        return
    vals = torch.stack([b[2] for b in buf]).float().cpu().numpy()
    if not np.all(np.isfinite(vals)):
        bad = buf[int(np.argwhere(~np.isfinite(vals).all(1))[0, 0])][0]
        sys.exit(f"stage {stage}: the loss became NaN or infinite at step {bad}; stopping. The last good "
                 f"checkpoint (end of the previous epoch) is intact in {args.out}; try a lower --lr.")
    if not master:
        return
    log.write([dict(stage=stage, epoch=epoch + 1, step=s, lr=lr, loss=v[0], ce=v[1], random=v[2], hard=v[3],
                    contour=v[4], seconds=time.time() - t0) for (s, lr, _), v in zip(buf, vals)])
    el = time.time() - t0
    eta = el / max(1, step - first_step) * (total - step)
    v = vals.mean(0)
    print(f"stage {stage} step {step}/{total} epoch {epoch + 1}: loss {v[0]:.4f} ce {v[1]:.4f} "
          f"metric r/h/c {v[2]:.2f}/{v[3]:.2f}/{v[4]:.2f}  {el / max(1, step - first_step):.2f} s/step "
          f"elapsed {fmt_time(el)} eta {fmt_time(eta)}", flush=True)


# ---------------------------------------------------------------------------------------------- main

def setup_distributed():
    """The one DDP block: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL on CUDA, gloo on CPU.
    Multi-node works the same: LOCAL_RANK picks this machine's GPU, the global RANK 0 alone writes (run folder,
    phantom, log). Every node needs --data at the same path (or a shared file system); each node's processes
    preprocess into their own --cache if it is not shared."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
            # the cores of this machine are shared by its own processes only (multi-node: not by `world`)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    else:
        rank, local_rank, world = 0, 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dict(ddp=ddp, rank=rank, local_rank=local_rank, world=world, device=device, master=rank == 0)


def prepare_data(args, ctx):
    """Phantom (if needed), preprocessing cache and the split; the master does the work, the others wait."""
    root = Path(args.data) if args.data else Path(args.phantom_dir)
    if ctx["master"] and args.data is None and not (root / "dataset.json").exists():
        print(f"generating the synthetic pelvic-CT phantom ({args.phantom_cases} cases) in {root}/")
        data.make_phantom(root, cases=args.phantom_cases, seed=args.split_seed)
    if ctx["ddp"]:
        dist.barrier()
    cases = data.find_cases(root, args.channel)
    if args.split == "all":                            # the model to deploy: every case trains
        train_names, val_names, test_names = sorted(c.name for c in cases), [], []
    else:
        train_names, val_names, test_names = data.split_cases([c.name for c in cases], args.split_seed,
                                                              fold=args.fold if args.folds else None, folds=args.folds)
    if ctx["master"]:
        how = f"fold {args.fold} of {args.folds}" if args.folds else args.split
        print(f"data {root}: {len(cases)} cases, split {how} train {len(train_names)} / val {len(val_names)} / "
              f"test {len(test_names)} (split seed {args.split_seed})")
        data.prepare_cases(cases, args.cache)
    if ctx["ddp"]:
        dist.barrier()
    preps = {p.name: p for p in data.prepare_cases(cases, args.cache, log=None)}
    ctx["dataset"] = dict(root=str(root.resolve()), cases=[c.name for c in cases], train=train_names,
                          val=val_names, test=test_names, channel=str(args.channel))
    return root, cases, preps, train_names, val_names, test_names


def main(argv=None):
    args = parse_args(argv)
    ctx = setup_distributed()
    device, master = ctx["device"], ctx["master"]
    torch.manual_seed(args.seed + ctx["rank"])        # per-rank seed (model init is re-seeded identically below)
    np.random.seed(args.seed + ctx["rank"])
    run = Path(args.out)
    for what, path in (("run folder --out", args.out), ("cache --cache", args.cache)):   # inputs stay untouched
        if args.data and Path(args.data).resolve() in (Path(path).resolve(), *Path(path).resolve().parents):
            sys.exit(f"error: the {what} {path} lies inside the input data folder {args.data}; choose another")
        if Path(path).exists() and not Path(path).is_dir():
            sys.exit(f"error: the {what} {path} is a file; give a folder")
    if master:
        try:
            run.mkdir(parents=True, exist_ok=True)
            if not args.resume and any(run.glob("stage*_last.pt")):
                sys.exit(f"error: {run} already holds a run; use --resume to continue it or --out for a new folder")
            if args.resume:
                check_resume(run, args)                      # before args.json is rewritten
            metrics.atomic_write_text(run / "args.json", json.dumps(vars(args), indent=2))
        except OSError as e:
            sys.exit(f"error: cannot write the run folder {run}: {e.strerror}; choose a writable --out")
        what = "Stage 1 (light UNet)" if args.stage == "1" else row_name(args.config)
        print(f"{what}, preset {args.preset}, {ctx['world']} process(es) on {device}, run {run}")
    try:
        root, cases, preps, tr, va, te = prepare_data(args, ctx)
    except (ValueError, FileExistsError) as e:              # data.DataError is a ValueError, as are bad --folds
        sys.exit(f"error: {e}")
    log = CsvLog(run / "log.csv", args.resume) if master else None
    t_start = time.time()

    if args.stage in ("1", "both"):
        pairs = {n: data.stage1_pair(preps[n], antialias=args.stage1_antialias) for n in tr + va}
        train_set = data.PatchDataset([pairs[n][0] for n in tr], [pairs[n][1] for n in tr], patch=64, n_slices=5,
                                      patches_per_image=args.stage1_patches, fg_fraction=args.fg_fraction,
                                      seed=args.seed, augment=args.stage1_augment)
        torch.manual_seed(args.seed)                   # identical initial weights on every rank
        model = M.LightUNet(in_channels=5, filters=args.stage1_filters).to(device)
        train_stage(1, model, train_set, lambda m: validate_stage1(m, [pairs[n] for n in va], device, args.amp),
                    args, ctx, log)
        if master and te:
            model.load_state_dict(load_checkpoint(run / "stage1_best.pt", device)["model"])
            score_stage1(model.eval(), preps, te, args, device, run)

    if args.stage1_from and master:
        copy_stage1(Path(args.stage1_from), run, ctx["dataset"])
    if args.stage in ("2", "both"):
        crops = {}
        for n in tr + va:
            c = data.label_centre(preps[n].label)
            crops[n] = (data.crop_around(preps[n].image, c)[0], data.crop_around(preps[n].label, c)[0])
        train_set = data.PatchDataset([crops[n][0] for n in tr], [crops[n][1] for n in tr], patch=64, n_slices=3,
                                      patches_per_image=args.patches, fg_fraction=args.fg_fraction, seed=args.seed,
                                      augment=args.augment)
        torch.manual_seed(args.seed)
        model = M.build_model(args.config, in_channels=3, width=args.width).to(device)
        if master:
            print(f"stage 2: {row_name(args.config)}, {M.count_parameters(model) / 1e6:.3f} M parameters")
        train_stage(2, model, train_set, lambda m: validate_stage2(m, [crops[n] for n in va], device, args.amp),
                    args, ctx, log)

    if master:
        print(f"training done in {fmt_time(time.time() - t_start)}")
    if master and args.stage != "1" and (run / "stage1_best.pt").exists() and not args.no_test and te:
        import infer
        pred_dir = run / "predictions"
        test_cases = [c for c in cases if c.name in te]
        infer.run(run, [c.image for c in test_cases], pred_dir, channel=args.channel, device=device,
                  overwrite=True)                   # its own run folder: a resumed run scores again
        rows = metrics.evaluate_folders(pred_dir, Path(test_cases[0].label).parent, only=te)
        summary = metrics.write_report(rows, run / "test_metrics.csv", extra={"config": args.config,
                                                                              "preset": args.preset})
        print(metrics.format_summary(summary, f"\n{row_name(args.config)} on the test split ({len(te)} cases)"))
        print(f"\nper-case metrics: {run / 'test_metrics.csv'}; total time {fmt_time(time.time() - t_start)}")
    if ctx["ddp"]:
        dist.destroy_process_group()

# ---------------------------------------------------------------------------------------------- small helpers

def write_csv(path: Path, rows: list[dict]):
    buf = io.StringIO()
    w = csv.DictWriter(buf, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    metrics.atomic_write_text(path, buf.getvalue())


def row_name(label: str) -> str:
    """Table II's names: 'UNet', 'UNet++', 'R' -> 'MetricUNet-R', '++H' -> 'MetricUNet++-H'."""
    if label in ("UNet", "UNet++"):
        return label
    return f"MetricUNet++-{label[2:]}" if label.startswith("++") else f"MetricUNet-{label}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["ablation"]:
        sys.exit("the ablation moved: python ablation.py (same flags)")
    main()
