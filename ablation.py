"""Section IV-D's experiments at a small scale: Table II's rows compared as in Tables III and IV,
Fig. 7's convergence curves, and the sensitivity study of Fig. 6 (lambda, sigma) and Table V (k).

    python ablation.py                                  # Tables II-IV, Fig. 7: 20-case phantom
    python ablation.py --data Task05_Prostate --channel T2   # the same on MRI, leave-one-out
    python ablation.py --study sensitivity              # Fig. 6 and Table V for MetricUNet-R
    python ablation.py --rows UNet,HCP --preset paper   # other rows, the paper's width (a GPU's)
    python figures.py                                   # Fig. 6, Fig. 7, Table III bars as PNGs
    # against another method (its own script, in its own Python): same folds, same training time
    python ablation.py --study baseline --data mri --channel T2 --preset cpu-mri
        --peer peer_monai.py --peer-python ../peerenv/bin/python --minutes 6

Each run is `train.main` with the flags a row needs; results/ gets the tables (markdown), per-case
CSVs and the Fig. 7 curves. Finished runs are kept in --runs and skipped, so a killed ablation
continues where it stopped and a finished one only rewrites its tables. train.py is the training
itself; this file is the harness around it.

The paper's protocol, and where it is silent (NOTES.md): as in the paper's ablation ("we construct
UNet to segment on the prostate region image which is same as the proposed two-stage learning
framework"), only Stage 2 changes between rows: one Stage 1 per seed and fold is shared by all rows,
so every row is scored through the same crops (Stage 1 -> crop -> Stage 2 -> mask on the input grid
-> metrics.py). Rows run innermost, so a slow spell of the machine hits all rows alike; paired
t-tests pair the same case under the same seed (Table IV); the training-time overhead (Section
IV-D-3: "less than 10 % additional training time") is the median over runs of the Stage-2 step time,
validation left out. """
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
import metricunet as M
import metrics
import phantom
from train import PRESETS, fmt_time, main as train_main

# Table III's rows that isolate one sampling strategy each (R, H, C) plus the full method (HCP),
# against the plain UNet baseline. Table II has twelve rows; these five answer the paper's main
# ablation question ("does each sampler help on its own, and do they add up?") in an hour on 2 CPU
# cores. Any row can be named with --rows.
ABLATION_ROWS = ("UNet", "R", "H", "C", "HCP")
# Fig. 6 sweeps lambda (Eq. 4) and sigma (Eq. 2); Table V sweeps k, the anchors per image. One value
# changes at a time, the others stay at the paper's (M.PAPER_DEFAULTS), as in the paper.
SENSITIVITY = {"lam": (0.1, 0.01, 0.001), "sigma": (0.1, 0.3, 0.5, 0.7, 1.0),
               "k": (20, 50, 100, 200)}


def parse_ablation_args(argv=None):
    """The command line of the rows study and the sensitivity study. A bad row name or preset is a
    one-line argparse error before anything runs; the defaults reproduce the committed tables in
    results/."""
    p = argparse.ArgumentParser(prog="ablation.py", description=(
        "Table II rows x seeds (Tables III-IV, Fig. 7) or the sensitivity study (Fig. 6, Table V) "
        "-> results/. "
        "Finished runs are kept in --runs and skipped, so a killed ablation continues where it "
        "stopped."))
    p.add_argument("--data",
                   help="data set folder (default: a 20-case phantom generated into --phantom-dir)")
    p.add_argument("--channel", default="0",
                   help="channel of 4-D images, by index or name (e.g. T2)")
    p.add_argument("--study", default="rows",
                   choices=["rows", "sensitivity", "embedding", "baseline"],
                   help="embedding: Section I's claim measured on the rows study's runs; "
                   "baseline: train.py against a peer script, leave-one-out, equal time")
    g = p.add_argument_group("--study baseline")
    g.add_argument("--peer", metavar="SCRIPT", help="the peer's training script (its --folds K "
                   "--fold I --minutes M --threads T --out DIR command line)")
    g.add_argument("--peer-python", default="python",
                   help="the Python that runs it (its own virtual environment)")
    g.add_argument("--minutes", type=float, help="the peer's training budget per fold (default: "
                   "the median training time of this project's folds)")
    g.add_argument("--flags", default="", help="extra train.py flags for this project's runs, "
                   "as one argument: --flags='--native-slices --epochs2 16'")
    g.add_argument("--label", default="", help="name of this project's variant (its run folders)")
    g.add_argument("--stage1-of", metavar="LABEL", help="reuse the Stage 1 of that variant's folds "
                   "(only Stage 2 differs; its Stage-1 time counts)")
    p.add_argument("--rows", default=",".join(ABLATION_ROWS),
                   help="Table II rows, comma-separated; UNet first")
    p.add_argument("--seeds", type=int, help="seeds per row (default 3; 1 with cross-validation)")
    p.add_argument("--folds", type=int,
                   help="cross-validation folds (default: leave-one-out below 10 cases)")
    p.add_argument("--preset", default="ablation", choices=list(PRESETS))
    p.add_argument("--results", default="results", help="where the tables and CSVs are written")
    p.add_argument("--runs", default="runs/ablation", help="where the run folders are kept")
    p.add_argument("--phantom-dir", help="default phantom-<preset>")
    p.add_argument("--cache", default="data_cache")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs1", type=int, help="override the preset's Stage-1 epochs")
    p.add_argument("--epochs2", type=int, help="override the preset's Stage-2 epochs")
    a = p.parse_args(argv)
    try:
        [M.get_config(r) for r in a.rows.split(",") if r.strip()]
    except ValueError as e:
        p.error(str(e))
    return a


def ablation_jobs(a):
    """(label, config, extra train.py flags) per variant: Table II rows, or MetricUNet-R with one of
    lambda, sigma, k changed (Fig. 6, Table V; the paper default is the rows study's R run,
    reused)."""
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    if a.study == "rows":
        return [(M.get_config(r).name, M.get_config(r).name, []) for r in rows]
    jobs = [("R", "R", [])]
    for name, values in SENSITIVITY.items():
        jobs += [(f"R {name}={v:g}", "R",
                  [f"--{name}", str(v)]) for v in values if v != getattr(M.PAPER_DEFAULTS, name)]
    return jobs


def patches_per_image(preset: str, stage: int, n_train: int) -> int:
    """Patches per image such that an epoch holds as many patches as the preset gives its own
    phantom's training split (ablation preset: 14 cases x 40 = 560 in Stage 2), so a 4-case MRI fold
    trains as long. Paper is silent (it has 339 training CTs and 500 patches each); with so few
    images, equal steps per run matter more than equal patches per image, or the smaller data set
    would also be the shorter training."""
    p = PRESETS[preset]
    n_ref = len(data.split_cases([str(i) for i in range(p["phantom_cases"])])[0])
    return math.ceil((p["patches"] if stage == 2 else p["stage1_patches"]) * n_ref / n_train)


def run_once(run_dir: Path, argv: list[str]):
    """One train.py run into run_dir, resumed if it was interrupted; its wall time is kept beside
    it.

    ablation_job.json is the "finished" marker, written atomically after train.main returns: a run
    folder without it is unfinished (killed mid-run) and continues with --resume from its last epoch
    checkpoint, to the same result as an uninterrupted run. The stored wall time is what the report
    sums, so a table rebuilt from kept runs states the time the runs took, not the seconds the
    rebuild took."""
    done = run_dir / "ablation_job.json"
    if done.exists():
        return json.loads(done.read_text())["wall_s"]
    t0 = time.time()
    resume = ["--resume"] if any(run_dir.glob("stage*_last.pt")) else []
    train_main(argv + ["--out", str(run_dir)] + resume)
    wall = time.time() - t0
    # "done" marker
    data.atomic_write_text(done, json.dumps(dict(wall_s=wall, argv=argv), indent=1))
    return wall


def training_seconds(log_csv: Path, stage: int = 2) -> float:
    """Seconds spent in training steps, validation excluded, from log.csv: for each epoch, the time
    of its last step minus the end of the previous epoch (step rows carry the time of their flush).

    Section IV-D compares training time ("less than 10 % additional training time"); validation runs
    whole volumes through the network and costs the same for every row, so leaving it out shows the
    cost of the metric module itself. Per-step medians from bench.py are the finer measurement; this
    one is per run."""
    with open(log_csv) as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] == str(stage)]
    total, prev_end = 0.0, 0.0
    for e in sorted({int(r["epoch"]) for r in rows}):
        steps = [float(r["seconds"]) for r in rows if int(r["epoch"]) == e and r["val_dsc"] == ""]
        ends = [float(r["seconds"]) for r in rows if int(r["epoch"]) == e and r["val_dsc"] != ""]
        total += max(steps) - prev_end
        prev_end = ends[-1] if ends else max(steps)
    return total


def read_case_rows(run_dir: Path, label: str, seed: int, fold: int | None) -> list[dict]:
    """test_metrics.csv of one run, as metric dicts keyed by 'case/seed' so paired tests pair like
    with like. Table IV's paired t-test needs the same image under the same conditions in both rows:
    with one Stage 1 per seed shared by all rows, 'case/seed' names exactly one crop, so a pair
    differs only in its Stage 2."""
    with open(run_dir / "test_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_s = training_seconds(run_dir / "log.csv")
    out = []
    for r in rows:
        d = {m: float(r[m]) for m in metrics.METRICS}
        d.update(case=f"{r['case']}/s{seed}", image=r["case"], row=label, seed=seed,
                 fold="" if fold is None else fold,
                 empty_prediction=r.get("empty_prediction") == "True", train_s=train_s)
        out.append(d)
    return out


def ablation_main(argv=None):
    """Run (or continue) a study, then write its table, per-case CSV and convergence CSV into
    --results.

    The input data set is read only; --results, --runs and --cache may not lie inside it. Without
    --data a 20-case phantom is generated once (seed 0) and reused. Folds: leave-one-out when there
    are fewer than 10 cases (the 5-case MRI subset), otherwise the fixed 70/10/20 split with 3
    seeds. Because finished runs are skipped, running the same command again rewrites the tables
    byte for byte from the kept runs."""
    a = parse_ablation_args(argv)
    if "RANK" in os.environ:          # under torchrun every rank would run and write everything
        sys.exit("error: ablation.py runs its rows one after another in one process; start it with "
                 "python, not torchrun (each run can use the GPU it is given)")
    root = Path(a.data) if a.data else Path(a.phantom_dir or f"phantom-{a.preset}")
    # inputs stay untouched
    for what, path in (("--results", a.results), ("--runs", a.runs), ("--cache", a.cache)):
        if a.data and Path(a.data).resolve() in (Path(path).resolve(),
                                                 *Path(path).resolve().parents):
            sys.exit(f"error: {what} {path} lies inside the input data folder {a.data}; choose "
                     f"another")
    try:                          # the outputs are checked before hours of training, not after
        for folder in (a.results, a.runs):
            Path(folder).mkdir(parents=True, exist_ok=True)
            data.atomic_write_text(Path(folder) / ".write-test", "")
            (Path(folder) / ".write-test").unlink()
    except OSError as e:
        sys.exit(f"error: cannot write into {e.filename or folder}: {e.strerror}; give a writable "
                 f"--results and --runs")
    # names of run folders and tables; a preset other than the default one gets its own, never mixed
    dataset = ((root.resolve().name if a.data else "phantom")
               + ("" if a.preset == "ablation" else f"_{a.preset}"))
    if not a.data and not (root / "dataset.json").exists():
        print(f"generating the {PRESETS[a.preset]['phantom_cases']}-case phantom in {root}/")
        phantom.make_phantom(root, cases=PRESETS[a.preset]["phantom_cases"], seed=0)
    try:
        names = [c.name for c in data.find_cases(root, a.channel)]
    except data.DataError as e:
        sys.exit(f"error: {e}")
    folds = a.folds or (len(names) if len(names) < 10 else None)
    # sensitivity: 9 runs, 1 seed
    seeds = list(range(a.seeds or (1 if folds or a.study == "sensitivity" else 3)))
    if a.study == "embedding":
        return embedding_study(a, root, dataset, seeds if not folds else [0], folds)
    if a.study == "baseline":
        return baseline_study(a, root, names)
    jobs = ablation_jobs(a)
    t_start = time.time()
    case_rows, curves, wall = run_ablation_grid(a, root, dataset, names, jobs, seeds, folds)
    out = Path(a.results)
    stem = f"{'ablation' if a.study == 'rows' else 'sensitivity'}_{dataset}"
    metrics.write_csv(out / f"{stem}_cases.csv", case_rows)
    metrics.write_csv(out / f"{stem}_convergence.csv", curves)
    text = ablation_report(a, dataset, jobs, case_rows, seeds, folds, len(names), wall)
    data.atomic_write_text(out / f"{stem}.md", text)
    print(text)
    print(f"\nwrote {out / (stem + '.md')} and its CSVs in {fmt_time(time.time() - t_start)}")


def run_ablation_grid(a, root, dataset, names, jobs, seeds, folds):
    """Every (fold, seed): one shared Stage 1, then each job's Stage 2 with test-split scoring.
    Folds, then seeds outermost and jobs innermost, so a slow spell of the machine hits all rows
    alike. Returns the per-case metric rows, the Fig. 7 curve rows and the summed wall time of the
    runs."""
    base = ["--preset", a.preset, "--cache", a.cache, "--workers", str(a.workers),
            "--log-every", "50", "--channel", a.channel]
    base += ["--data", a.data] if a.data else ["--phantom-dir", str(root)]
    for stage in (1, 2):
        if getattr(a, f"epochs{stage}"):
            base += [f"--epochs{stage}", str(getattr(a, f"epochs{stage}"))]
    runs = Path(a.runs) / dataset
    case_rows, curves, wall = [], [], 0.0
    a.stage1_rows = []
    for fold in (range(folds) if folds else [None]):
        # Section IV-D varies Stage 2 only: one Stage 1 per (fold, seed), trained first and copied
        # into every row's run (--stage1-from), so all rows of a seed are scored through the very
        # same crops.
        n_train = len(data.split_cases(names, 0, fold=fold, folds=folds)[0])
        fold_flags = ["--folds", str(folds), "--fold", str(fold)] if folds else []
        for seed in seeds:
            tag = (f"f{fold}-" if folds else "") + f"s{seed}"
            s1 = runs / f"stage1-{tag}"
            wall += run_once(s1, base + fold_flags + [
                "--stage", "1", "--seed", str(seed),
                "--stage1-patches", str(patches_per_image(a.preset, 1, n_train))])
            if (s1 / "stage1_test.csv").exists():
                with open(s1 / "stage1_test.csv") as f:
                    a.stage1_rows += [dict(r, seed=seed, fold="" if fold is None else fold)
                                      for r in csv.DictReader(f)]
            for label, config, extra in jobs:
                run_dir = runs / (label.replace(" ", "_").replace("=", "") + f"-{tag}")
                wall += run_once(run_dir, base + fold_flags + extra + [
                    "--stage", "2", "--config", config, "--seed", str(seed),
                    "--stage1-from", str(s1),
                    "--patches", str(patches_per_image(a.preset, 2, n_train))])
                case_rows += read_case_rows(run_dir, label, seed, fold)
                curves += convergence_rows(run_dir / "log.csv", label, seed, fold)
    return case_rows, curves, wall


def convergence_rows(log_csv: Path, label, seed, fold):
    """Fig. 7: per-step cross-entropy and per-epoch validation DSC of Stage 2. The paper plots the
    loss curves of UNet and MetricUNet to show that the metric term speeds up convergence;
    cross-entropy (Eq. 3) is the part every row shares, so it is the curve that compares rows fairly
    (the total loss of a metric row also holds lambda * L_metric)."""
    with open(log_csv) as f:
        return [dict(row=label, seed=seed, fold="" if fold is None else fold, epoch=r["epoch"],
                     step=r["step"], ce=r["ce"], loss=r["loss"], val_dsc=r["val_dsc"])
                for r in csv.DictReader(f) if r["stage"] == "2"]


def ablation_report(a, dataset, jobs, rows, seeds, folds, n_cases, wall) -> str:
    """Markdown: Table III layout (+ HD95, aRVD), Table IV-style paired p-values vs the first row,
    the training time of each row against it, and the DSC of each seed apart.

    Everything in it comes from the kept runs (no clock, no host name beyond the machine's kind), so
    the same runs always give the same bytes. The per-seed table is there because the t-test cannot
    see it: 4 test images x 3 seeds are 12 pairs but not 12 independent patients, and one
    unconverged seed can carry a mean."""
    import platform
    labels = [j[0] for j in jobs]
    by = {lab: [r for r in rows if r["row"] == lab] for lab in labels}
    ref = labels[0]
    split = f"leave-one-out over {n_cases} cases ({folds} folds)" if folds == n_cases else (
        f"{folds}-fold cross-validation" if folds else "the fixed 70/10/20 split (split seed 0)")
    cmd = ablation_command(a)
    p = PRESETS[a.preset]
    per_epoch = p["patches"] * len(data.split_cases([str(i) for i in range(p["phantom_cases"])])[0])
    title = ("Ablation (Tables II-IV)" if a.study == "rows"
             else "Sensitivity of MetricUNet-R (Fig. 6, Table V)")
    stem = f"{'ablation' if a.study == 'rows' else 'sensitivity'}_{dataset}"
    L = [f"# {title} on {dataset}", "",
         f"Generated by `{cmd}` (ablation.py `ablation_main`). Do not edit: rerun the command.", "",
         f"- data: {dataset}, {n_cases} cases, {split}; seeds {', '.join(map(str, seeds))}; each "
         f"row's n = test cases x seeds = {len(by[ref])}",
         f"- preset `{a.preset}`: Stage-2 width {p['width']} (Table I = 1.0), batch {p['batch']}, "
         f"{a.epochs2 or p['epochs2']} Stage-2 epochs of {per_epoch} patches, Stage 1 shared by "
         f"all rows of a seed; paper defaults k=20, m=1, sigma=0.7, eps=0.01, beta=0.1, "
         f"lambda=0.01, tau=0.1",
         f"- machine: {platform.machine()}, {os.cpu_count()} CPU threads, torch "
         f"{torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}; total run "
         f"time {fmt_time(wall)}",
         ""]
    L += ["## Segmentation (Table III layout; HD95 and aRVD as in Tables IV and VI)", "",
          "| method | n | DSC mean ± std | DSC median | ASD (mm) mean ± std | ASD median "
          "| SEN mean ± std | PPV mean ± std | HD95 (mm) mean ± std | aRVD (%) mean ± std |",
          "|---" * 10 + "|"]
    for lab in labels:
        s = metrics.summarize(by[lab])
        ms = lambda m, d=4: f"{s[m]['mean']:.{d}f} ± {s[m]['std']:.{d}f}"
        L.append(f"| {M.row_name(lab)} | {s['cases']} | {ms('DSC')} | {s['DSC']['median']:.4f} | "
                 f"{ms('ASD', 2)} | {s['ASD']['median']:.2f} | {ms('SEN')} | {ms('PPV')} | "
                 f"{ms('HD95', 2)} | {ms('aRVD', 1)} |")
    L += ["", f"## Paired two-sided t-tests against {M.row_name(ref)} (Table IV style; pairs = "
              f"same case, same seed)",
          "", "| method | ΔDSC | p DSC | ΔASD (mm) | p ASD | p SEN | p PPV | p HD95 |",
          "|---" * 8 + "|"]
    for lab in labels[1:]:
        pv = metrics.paired_pvalues(by[lab], by[ref])
        d = lambda m: np.mean([r[m] for r in by[lab]]) - np.mean([r[m] for r in by[ref]])
        L.append(f"| {M.row_name(lab)} | {d('DSC'):+.4f} | {pv['DSC']:.3g} | {d('ASD'):+.2f} | "
                 f"{pv['ASD']:.3g} | {pv['SEN']:.3g} | {pv['PPV']:.3g} | {pv['HD95']:.3g} |")
    # median over runs: one run slowed by other work on the machine must not decide the overhead
    L += ["", f"## Stage-2 training time against {M.row_name(ref)} (validation excluded; median "
              f"over runs)", "",
          "| method | seconds per run (median) | overhead | slowest run |", "|---|---|---|---|"]
    per_run = {lab: list({(r["seed"], r["fold"]): r["train_s"] for r in by[lab]}.values())
               for lab in labels}
    t = {lab: float(np.median(v)) for lab, v in per_run.items()}
    for lab in labels:
        L.append(f"| {M.row_name(lab)} | {t[lab]:.0f} | {100 * (t[lab] / t[ref] - 1):+.1f} % | "
                 f"{max(per_run[lab]):.0f} |")
    if len(seeds) > 1:
        L += ["", "## Mean DSC of each seed (seed-to-seed spread)", "",
              "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---" * (len(seeds) + 1) + "|"]
        for lab in labels:
            dsc = [np.mean([r["DSC"] for r in by[lab] if r["seed"] == s]) for s in seeds]
            L.append(f"| {M.row_name(lab)} | " + " | ".join(f"{v:.4f}" for v in dsc) + " |")
    s1 = getattr(a, "stage1_rows", [])
    if s1:
        errs = np.array([float(r["centre_error_mm"]) for r in s1])
        shown = [format(e, ".1f") if np.isfinite(e) else "not found" for e in errs]
        L += ["", "## Stage 1 on the test cases (shared by all rows; centre error of the crop "
                  "centre it gives)", "",
              "| fold | seed | case | DSC at 1/4 size | centre error (mm) |",
              "|---|---|---|---|---|"]
        L += [f"| {r['fold']} | {r['seed']} | {r['case']} | {float(r['dsc_quarter']):.4f} | {e} |"
              for r, e in zip(s1, shown)]
        L += ["", f"Centre error: median {np.nanmedian(errs):.1f} mm, worst "
                  f"{np.nanmax(errs) if np.isfinite(errs).any() else float('nan'):.1f} mm, "
                  f"prostate not found in {int((~np.isfinite(errs)).sum())} of {len(errs)}."]
    empties = sum(r["empty_prediction"] for r in rows)
    L += ["", f"Empty predictions (scored with the volume diagonal as distance): {empties}.",
          f"Per-case values: `{stem}_cases.csv`; Fig. 7 curves (per-step cross-entropy, "
          f"per-epoch validation DSC): `{stem}_convergence.csv`.", ""]
    return "\n".join(L)


# ------------------------------------------------------------------------ the embedding space
# Section I: the metric module makes the voxel features "form a discriminate embedding space". The
# rows study's runs measured on their own test cases: conv6d features (L2-normalised, as Eq. 2 sees
# them) of up to 16 prostate slices of the ground-truth-centred crop, whole slices as at test time.

def voxel_features(net, prep, max_slices: int = 16, step: int = 1):
    """(features (V, d), prostate (V,), contour (V,), within 3 voxels of the contour (V,)) for the
    voxels of up to max_slices evenly spaced prostate slices, input slices `step` apart as the run
    was trained (data.native_slice_step); the contour is the contour sampler's (mask minus its 3x3
    erosion, slice by slice)."""
    import torch.nn.functional as F
    from scipy import ndimage
    crop, lab = data.prostate_crop(prep)
    zs = np.flatnonzero(lab.any((0, 1)))
    k = min(max_slices, len(zs))                      # evenly spaced, the end slices left out
    zs = zs[np.linspace(0, len(zs) - 1, k + 2)[1:-1].round().astype(int)]
    with torch.no_grad():
        x = data.slices_25d(crop, 3, step=step)[zs]
        f = F.normalize(net.features(torch.from_numpy(x)), dim=1)
    y = lab[:, :, zs].transpose(2, 0, 1) > 0                               # (Z, X, Y) like f
    contour = y & ~ndimage.binary_erosion(y, np.ones((1, 3, 3)), border_value=1)
    near = np.stack([ndimage.distance_transform_edt(~c) <= 3 for c in contour])
    flat = lambda m: torch.from_numpy(m.reshape(-1))
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), flat(y), flat(contour), flat(near)


def embedding_measures(run_dir: Path, preps, seed: int, n: int = 2000) -> dict:
    """{test case: measures} of one run: the share of random triplets that violate Eq. 2's margin
    (anchors from the prostate, and from the contour only), and the Fisher ratio of prostate against
    background features (all voxels, and within 3 voxels of the contour). n voxels per set, drawn
    with replacement from a generator seeded by `seed`, so the measurement repeats exactly."""
    ck = M.load_checkpoint(run_dir / "stage2_best.pt")
    net = M.build_model(ck["args"]["config"], width=ck["args"]["width"])
    net.load_state_dict(ck["model"])
    net.eval()
    sigma, out = ck["args"]["sigma"], {}
    for name in ck["dataset"]["test"]:
        step = data.native_slice_step(preps[name], ck["args"].get("native_slices", False))
        f, y, contour, near = voxel_features(net, preps[name], step=step)
        g = torch.Generator().manual_seed(seed)
        pick = lambda m: f[m.nonzero()[:, 0][torch.randint(int(m.sum()), (n,), generator=g)]]
        out[name] = dict(
            violations=M.margin_violations(pick(y), pick(y), pick(~y), sigma),
            violations_contour=M.margin_violations(pick(contour), pick(y), pick(~y), sigma),
            fisher=M.fisher_ratio(pick(y), pick(~y)),
            fisher_near=M.fisher_ratio(pick(y & near), pick(~y & near)))
    return out


EMBEDDING = ("violations", "violations_contour", "fisher", "fisher_near")


def embedding_study(a, root, dataset, seeds, folds):
    """`python ablation.py --study embedding`: the measures of every (row, seed or fold, test
    case), UNet against each metric row (paired: same case, same seed), and their correlation with
    the run's DSC and ASD -> results/embedding_<data set>.md and _cases.csv; a PCA picture of one
    held-out slice, UNet beside the last row. Needs the rows study's runs (it trains nothing)."""
    from scipy import stats
    import figures
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    cases = data.find_cases(root, a.channel)
    try:                                         # a moved data set or a new --cache: fill it first
        data.prepare_cases(cases, a.cache)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    preps, runs, table = data.CachedCases(cases, a.cache), Path(a.runs) / dataset, []
    for fold in (range(folds) if folds else [None]):
        for seed in seeds:
            tag = (f"f{fold}-" if folds else "") + f"s{seed}"
            for label in rows:
                run_dir = runs / f"{M.get_config(label).name}-{tag}"
                if not (run_dir / "ablation_job.json").exists():
                    sys.exit(f"error: {run_dir} is not a finished run; run the rows study first "
                             f"(the same command without --study)")
                scores = {r["case"]: r for r in csv.DictReader(open(run_dir / "test_metrics.csv"))}
                for case, m in embedding_measures(run_dir, preps, seed).items():
                    table.append(dict(row=label, seed=seed, fold="" if fold is None else fold,
                                      case=case, **m, DSC=float(scores[case]["DSC"]),
                                      ASD=float(scores[case]["ASD"])))
    out = Path(a.results)
    metrics.write_csv(out / f"embedding_{dataset}_cases.csv", table)
    by = {lab: [r for r in table if r["row"] == lab] for lab in rows}
    cmd = ("python ablation.py --study embedding" + (f" --data {a.data}" if a.data else "")
           + (f" --seeds {a.seeds}" if a.seeds else ""))
    L = [f"# The embedding space (Section I) on {dataset}", "",
         f"Generated by `{cmd}` from the rows study's runs; n = {len(by[rows[0]])} test cases x "
         f"seeds per row. Measures of 2,000 seeded voxels per set: triplets violating Eq. 2's "
         f"margin (all prostate anchors, contour anchors), Fisher ratio prostate vs background "
         f"(all voxels, within 3 voxels of the contour).", "",
         "| method | violations | violations, contour anchors | Fisher | Fisher near contour "
         "| DSC |", "|---|---|---|---|---|---|"]
    ms = lambda v: f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}"
    for lab in rows:
        L.append(f"| {M.row_name(lab)} | " + " | ".join(ms([r[k] for r in by[lab]])
                                                         for k in EMBEDDING + ("DSC",)) + " |")
    L += ["", f"Paired against {M.row_name(rows[0])} (same case, same seed): mean difference (p, "
              f"two-sided paired t-test)", "", "| method | " + " | ".join(EMBEDDING) + " |",
          "|---" * (len(EMBEDDING) + 1) + "|"]
    for lab in rows[1:]:
        cells = []
        for k in EMBEDDING:
            x, y = np.array([r[k] for r in by[lab]]), np.array([r[k] for r in by[rows[0]]])
            p = stats.ttest_rel(x, y).pvalue if len(x) > 1 and np.any(x != y) else 1.0
            cells.append(f"{np.mean(x - y):+.3f} (p {p:.2g})")
        L.append(f"| {M.row_name(lab)} | " + " | ".join(cells) + " |")
    L += ["", "Pearson correlation over every case of every row:", ""]
    def pearson(x, y):                                  # undefined when either is constant
        x, y = np.asarray(x, float), np.asarray(y, float)
        return "undefined" if x.std() == 0 or y.std() == 0 else f"{np.corrcoef(x, y)[0, 1]:+.2f}"
    for k in EMBEDDING:
        v = [r[k] for r in table]
        L.append(f"- {k}: r = {pearson(v, [r['DSC'] for r in table])} with DSC, "
                 f"{pearson(v, [r['ASD'] for r in table])} with ASD")
    data.atomic_write_text(out / f"embedding_{dataset}.md", "\n".join(L) + "\n")
    print("\n".join(L))
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: the PCA picture is left out (pip install matplotlib)")
        return
    # the held-out case where UNet does best: the fairest place to compare the two spaces
    first = max((r for r in table if r["row"] == rows[0]), key=lambda r: r["DSC"])
    tag = (f"f{first['fold']}-" if folds else "") + f"s{first['seed']}"
    panels = []
    for label in (rows[0], rows[-1]):
        ck = M.load_checkpoint(runs / f"{M.get_config(label).name}-{tag}" / "stage2_best.pt")
        net = M.build_model(ck["args"]["config"], width=ck["args"]["width"])
        net.load_state_dict(ck["model"])
        prep = preps[first["case"]]
        step = data.native_slice_step(prep, ck["args"].get("native_slices", False))
        f, y, contour, _ = voxel_features(net.eval(), prep, max_slices=1, step=step)
        panels.append((M.row_name(label), f.numpy(), y.numpy(), contour.numpy()))
    path = out / f"embedding_{dataset}_pca.png"
    print(f"wrote {figures.embedding_figure(figures.pyplot(), panels, path, first['case'])}")


# -------------------------------------------------------------------------- against a peer baseline
# What a user would run instead of this project (e.g. MONAI's 3-D tutorial adapted to the prostate),
# trained on the same leave-one-out folds for the same wall-clock time, then scored by the same code
# (metrics.py, on the input's grid): DSC, HD95, ASD, pieces per mask, inference seconds. This
# project's masks are scored raw and with one piece kept; which of the two its runs would use is
# decided on the pooled folds (train.one_piece_decision), as nnU-Net decides on its
# cross-validation.

def score_mask(pred_path, gt_path) -> dict:
    """One mask against its label, as metrics.py scores it, plus its pieces."""
    pred, _, _ = metrics.load_mask(pred_path)
    gt, _, spacing = metrics.load_mask(gt_path)
    return {**metrics.evaluate(pred, gt, spacing), "pieces": metrics.count_pieces(pred)}


def our_fold(a, root, fold: int, folds: int, case) -> list[dict]:
    """This project's run on one fold (train.py, resumed or reused like every ablation run), then
    its test case segmented raw and with one piece kept (infer.run, timed), both scored."""
    import infer
    run = Path(a.runs) / (a.label or a.preset) / f"fold{fold}"
    argv = ["--data", str(root), "--channel", a.channel, "--preset", a.preset, "--folds",
            str(folds), "--fold", str(fold), "--cache", a.cache, "--workers", str(a.workers),
            "--no-test"]                                  # the test case is segmented below, timed
    stage1_run = Path(a.runs) / a.stage1_of / f"fold{fold}" if a.stage1_of else run
    if a.stage1_of:
        argv += ["--stage", "2", "--stage1-from", str(stage1_run)]
    run_once(run, argv + a.flags.split())
    train_s = training_seconds(stage1_run / "log.csv", 1) + training_seconds(run / "log.csv", 2)
    rows = []
    for one_piece in (False, True):
        out = run / ("study_one_piece" if one_piece else "study_raw")
        t0 = time.time()
        [mask] = infer.run(run, [(case.name, case.image, case.channel)], out, overwrite=True,
                           one_piece=one_piece, log=lambda *_: None)
        rows.append(dict(case=case.name, method=f"{a.label or a.preset}"
                         + (" + one piece" if one_piece else ""), infer_s=time.time() - t0,
                         train_s=train_s, **score_mask(mask, case.label)))
    return rows


def peer_fold(a, root, peer_fold_index: int, folds: int, case, minutes: float) -> dict:
    """The peer on the same test case: its own script, in its own Python, for `minutes` of
    training; its mask scored by metrics.py. A finished fold (results.csv) is reused."""
    import subprocess
    out = Path(a.runs) / "peer" / f"fold{peer_fold_index}"
    if not (out / "results.csv").is_file():
        cmd = [a.peer_python, a.peer, "--train-dir", str(root), "--folds", str(folds), "--fold",
               str(peer_fold_index), "--minutes", f"{minutes:.2f}", "--threads",
               str(torch.get_num_threads()), "--out", str(out)]
        print(" ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"error: the peer failed on fold {peer_fold_index}; see its output above")
    with open(out / "results.csv") as f:
        [own] = [r for r in csv.DictReader(f) if r["case"] == case.name]
    return dict(case=case.name, method="peer", infer_s=float(own["infer_s"]),
                train_s=float(own["train_s"]),
                **score_mask(out / f"{case.name}_pred.nii.gz", case.label))


def baseline_study(a, root, names):
    """--study baseline: every leave-one-out fold, this project first (its training time sets the
    peer's budget unless --minutes), then the peer if --peer is given; one table in --results."""
    import train
    if a.peer and not Path(a.peer).is_file():
        sys.exit(f"error: --peer {a.peer}: no such script")
    cases = {c.name: c for c in data.find_cases(root, a.channel)}
    folds = len(names)                # leave-one-out: the peer's interleaved folds are the same
    ours = []
    for fold in range(folds):
        [test] = data.split_cases(names, 0, fold=fold, folds=folds)[2]
        ours += our_fold(a, root, fold, folds, cases[test])
    minutes = a.minutes or float(np.median([r["train_s"] for r in ours])) / 60
    peer = [peer_fold(a, root, sorted(names).index(n), folds, cases[n], minutes)
            for n in sorted(names)] if a.peer else []
    rows = ours + peer
    raw = [r for r in ours if "one piece" not in r["method"]]
    one = [r for r in ours if "one piece" in r["method"]]
    keep = train.one_piece_decision([dict(dsc_raw=r["DSC"], dsc_one_piece=b["DSC"])
                                     for r, b in zip(raw, one)])
    label = a.label or a.preset
    stem = f"baseline_{root.resolve().name}_{label}"
    out = Path(a.results)
    metrics.write_csv(out / f"{stem}_cases.csv", rows)
    digits = dict(DSC=3, HD95=1, ASD=2, pieces=1, infer_s=1)
    ms = lambda v, k: f"{np.mean(v):.{digits[k]}f} ± {np.std(v, ddof=1):.{digits[k]}f}"
    L = [f"# This project against the peer on {root.resolve().name}, leave-one-out", "",
         f"Generated by `python ablation.py --study baseline --data {root.resolve().name} "
         f"--channel {a.channel}"
         f" --preset {a.preset}" + (f" --flags='{a.flags}'" if a.flags else "")
         + (f" --label {a.label}" if a.label else "")
         + (f" --stage1-of {a.stage1_of}" if a.stage1_of else "")
         + (f" --peer PEER_SCRIPT --minutes {minutes:.2f}" if a.peer else "")
         + f"`; {folds} folds, each case tested once; every mask scored by metrics.py on the "
         f"input's grid.", "",
         "| method | DSC | HD95 mm | ASD mm | pieces | inference s | training min |",
         "|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        L.append(f"| {method} | " + " | ".join(ms([r[k] for r in rs], k) for k in digits)
                 + f" | {np.mean([r['train_s'] for r in rs]) / 60:.1f} |")
    L += ["", f"Post-processing decided on the pooled folds (keep the piece at the prostate centre "
              f"when the mean DSC does not drop): {'one piece' if keep else 'raw masks'}.", ""]
    data.atomic_write_text(out / f"{stem}.md", "\n".join(L) + "\n")
    print("\n".join(L))


def ablation_command(a) -> str:
    """The command line that regenerates a table, flags at their defaults left out: printed at the
    table's top, so a reader knows exactly what to run to check or extend it."""
    flags = [f"--data {a.data} --channel {a.channel}" if a.data else "",
             "--study sensitivity" if a.study == "sensitivity" else "",
             f"--rows {a.rows}" if a.study == "rows" and a.rows != ",".join(ABLATION_ROWS) else "",
             f"--seeds {a.seeds}" if a.seeds else "", f"--folds {a.folds}" if a.folds else "",
             f"--preset {a.preset}" if a.preset != "ablation" else "",
             f"--epochs1 {a.epochs1}" if a.epochs1 else "",
             f"--epochs2 {a.epochs2}" if a.epochs2 else ""]
    return " ".join(["python ablation.py"] + [f for f in flags if f])


if __name__ == "__main__":
    data.run_command(lambda: ablation_main(sys.argv[1:]),
                     "finished runs are kept; the same command continues where it stopped")
