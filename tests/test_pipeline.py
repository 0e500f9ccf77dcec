"""train.py and infer.py end to end on a small phantom: DDP, resume, output geometry, learning."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import data
import infer
from phantom import make_phantom
import metricunet as M
import ablation
import train

ROOT = Path(__file__).resolve().parents[1]
MSD = ROOT.parent / "shared" / "data" / "msd-prostate-subset"
TINY = ["--width", "0.125", "--stage1-filters", "8", "--batch", "8", "--workers", "0",
        "--log-every", "5"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe")
    root = make_phantom(base / "phantom", cases=4, seed=11, log=None)
    data.prepare_cases(data.find_cases(root), base / "cache", log=None)  # warm the shared cache
    return root, base / "cache"


def run_py(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, **kw)


@pytest.fixture(scope="module")
def trained_run(phantom, tmp_path_factory):
    """A short two-stage training (no test-split inference), shared by the inference tests."""
    root, cache = phantom
    out = tmp_path_factory.mktemp("run") / "run"
    train.main(["--data", str(root), "--cache", str(cache), "--out", str(out), "--no-test",
                "--epochs1", "2", "--epochs2", "4", "--stage1-patches", "48", "--patches", "128",
                "--fg-fraction", "0.5", "--lr", "0.03", *TINY])
    return out


def test_ddp_two_ranks(phantom, tmp_path):
    root, cache = phantom
    probe, out = tmp_path / "probe", tmp_path / "run"
    probe.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port=29533", "tests/ddp_probe.py", "--data", str(root), "--cache",
                        str(cache), "--out", str(out), "--stage", "2", "--epochs2", "2",
                        "--patches", "24", "--augment", "spatial", "--no-test", *TINY], cwd=ROOT,
                       env=dict(os.environ, PROBE_DIR=str(probe), OMP_NUM_THREADS="1",
                                CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r0, r1 = (json.loads((probe / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["params"] == r1["params"]  # identical after all-reduce
    assert r0["seen"] and r1["seen"] and not set(r0["seen"]) & set(r1["seen"])   # different samples
    assert r0["written"] and r1["written"] == []                          # only rank 0 wrote
    assert (out / "stage2_last.pt").exists()


def test_resume_after_a_crash_matches_an_uninterrupted_run(phantom, tmp_path):
    root, cache = phantom
    # augmentation rides the epoch
    common = ["train.py", "--data", str(root), "--cache", str(cache), "--stage", "2",
              "--epochs2", "3", "--patches", "16", "--augment", "spatial", "--no-test", *TINY]
    full = run_py(common + ["--out", str(tmp_path / "a")], timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    # a crash: the process is killed (SIGKILL, no clean-up) as soon as the first epoch's checkpoint
    # exists
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, *common, "--out", str(tmp_path / "b")], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    checkpoint = tmp_path / "b" / "stage2_last.pt"
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    # refuses to clobber the run
    again = run_py(common + ["--out", str(tmp_path / "b")], timeout=300)
    assert again.returncode != 0 and "--resume" in again.stderr
    resumed = run_py(common + ["--out", str(tmp_path / "b"), "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after epoch" in resumed.stdout
    a = torch.load(tmp_path / "a" / "stage2_last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "stage2_last.pt", weights_only=True)
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k


def test_checkpoint_contents(trained_run):
    ck = torch.load(trained_run / "stage2_best.pt", weights_only=True)
    assert {"model", "optimizer", "step", "epoch", "args", "dataset", "generator"} <= set(ck)
    assert ck["args"]["config"] == "HCP" and len(ck["dataset"]["test"]) >= 1
    rows = (trained_run / "log.csv").read_text().splitlines()
    assert rows[0].startswith("stage,epoch,step,lr,loss,ce") and len(rows) > 20


def test_training_beats_an_untrained_network(phantom, trained_run):
    root, cache = phantom
    ck = torch.load(trained_run / "stage2_best.pt", weights_only=True)
    preps = {p.name: p for p in data.prepare_cases(data.find_cases(root), cache, log=None)}
    crops = []
    for n in ck["dataset"]["test"] + ck["dataset"]["val"]:
        c = data.label_centre(preps[n].label)
        crops.append((data.crop_around(preps[n].image, c)[0],
                      data.crop_around(preps[n].label, c)[0]))
    trained = M.build_model("HCP", width=0.125)
    trained.load_state_dict(ck["model"])
    torch.manual_seed(0)
    untrained = M.build_model("HCP", width=0.125)
    dev = torch.device("cpu")
    d_trained = train.validate_stage2(trained.eval(), crops, [1] * len(crops), dev)[0]
    d_untrained = train.validate_stage2(untrained.eval(), crops, [1] * len(crops), dev)[0]
    assert d_trained > d_untrained + 0.4, (d_trained, d_untrained)


def test_inference_keeps_shape_and_affine_anisotropic_phantom(phantom, trained_run, tmp_path):
    root, _ = phantom
    src = root / "imagesTr" / "phantom_001.nii.gz"  # stored LPS, anisotropic spacing
    out = tmp_path / "pred"
    infer.run(trained_run, [("phantom_001", src, 0)], out, save_prob=True, log=lambda *a: None)
    ref, pred = nib.load(str(src)), nib.load(str(out / "phantom_001.nii.gz"))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    assert pred.get_data_dtype() == np.uint8
    prob = nib.load(str(out / "phantom_001_prob.nii.gz"))
    assert prob.shape == ref.shape and 0 <= prob.get_fdata().min() and prob.get_fdata().max() <= 1


@pytest.mark.skipif(not MSD.is_dir(), reason="shared Decathlon subset not present")
def test_inference_on_a_decathlon_case(trained_run, tmp_path):
    src = MSD / "imagesTr" / "prostate_18.nii.gz"                   # 4-D (x, y, z, channel) MRI
    rc = infer.main([str(trained_run), str(src), str(tmp_path / "pred"), "--channel", "0"])
    assert rc == 0
    ref, pred = nib.load(str(src)), nib.load(str(tmp_path / "pred" / "prostate_18.nii.gz"))
    assert pred.shape == ref.shape[:3] and np.allclose(pred.affine, ref.affine)


def test_inference_refuses_to_write_into_its_input_folder(phantom, trained_run, capsys):
    root, _ = phantom
    before = sorted(p.name for p in (root / "imagesTr").iterdir())
    assert infer.main([str(trained_run), str(root / "imagesTr"), str(root / "imagesTr")]) == 2
    assert "input folder" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == before


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(phantom, tmp_path,
                                                                           monkeypatch):
    root, cache = phantom
    calls = {"n": 0}
    real = M.total_loss

    def poisoned(*a, **k):  # finite in epoch 1 (3 steps), NaN from the 5th step on
        loss, parts = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] >= 5 else (loss, parts)

    monkeypatch.setattr(train.M, "total_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="NaN or infinite at step 5"):
        train.main(["--data", str(root), "--cache", str(cache), "--out", str(out), "--stage", "2",
                    "--epochs2", "3", "--patches", "12", "--no-test", *TINY])
    ck = torch.load(out / "stage2_last.pt", weights_only=True)
    assert ck["epoch"] == 0 and all(torch.isfinite(v.float()).all() for v in ck["model"].values())


def test_train_refuses_bad_arguments_without_writing(phantom, tmp_path, capsys):
    root, cache = phantom
    before = sorted(str(p) for p in root.rglob("*"))
    with pytest.raises(SystemExit, match="inside the input data folder"):
        train.main(["--data", str(root), "--out", str(root / "run"), "--cache", str(cache)])
    with pytest.raises(SystemExit):
        train.main(["--data", str(root), "--config", "MetricUNet-XYZ"])
    assert "Table II rows are" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not found"):
        train.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--cache",
                    str(cache)])
    with pytest.raises(SystemExit, match="inside the input data folder"):
        ablation.ablation_main(["--data", str(root), "--results", str(root / "results"), "--cache",
                                str(cache)])
    with pytest.raises(SystemExit, match="folds"):                       # 9 folds of 4 cases
        train.main(["--data", str(root), "--out", str(tmp_path / "run9"), "--cache", str(cache),
                    "--folds", "9"])
    assert not (tmp_path / "run9").exists()  # refused before any writing
    assert sorted(str(p) for p in root.rglob("*")) == before


def test_training_seconds_leaves_out_validation(tmp_path):
    # epoch 1: steps flushed at 4 s and 10 s, validation ends at 15 s; epoch 2: steps at 22 s and 30
    # s, then validation until 40 s. Training time = 10 + (30 - 15) = 25 s. Stage-1 rows are
    # ignored.
    log = tmp_path / "log.csv"
    rows = ["stage,epoch,step,lr,loss,ce,random,hard,contour,val_dsc,val_centre_mm,seconds",
            "1,1,5,0.01,1,1,0,0,0,,,99", "2,1,1,0.01,1,1,0,0,0,,,4", "2,1,2,0.01,1,1,0,0,0,,,10",
            "2,1,2,,,,,,,0.5,nan,15", "2,2,3,0.01,1,1,0,0,0,,,22", "2,2,4,0.01,1,1,0,0,0,,,30",
            "2,2,4,,,,,,,nan,nan,40"]
    log.write_text("\n".join(rows) + "\n")
    assert ablation.training_seconds(log) == pytest.approx(25.0)


def test_ablation_report_hand_numbers():
    # UNet DSC 0.80 / 0.80, R 0.85 / 0.95 on the same two cases. Paired differences 0.05, 0.15: mean
    # 0.1, sd 0.0707, t = 0.1 / (0.0707 / sqrt 2) = 2 with 1 degree of freedom, whose two-sided p is
    # that of a Cauchy variable: 1 - 2 atan(2) / pi = 0.2952. R trains 10 % longer than UNet.
    base = dict(ASD=1.0, SEN=0.9, PPV=0.9, HD95=2.0, HD=3.0, aRVD=5.0, seed=0, fold="",
                empty_prediction=False)
    rows = [dict(base, row="UNet", case="a/s0", DSC=0.80, train_s=100.0),
            dict(base, row="UNet", case="b/s0", DSC=0.80, train_s=100.0),
            dict(base, row="R", case="a/s0", DSC=0.85, train_s=110.0),
            dict(base, row="R", case="b/s0", DSC=0.95, train_s=110.0)]
    a = ablation.parse_ablation_args(["--rows", "UNet,R"])
    text = ablation.ablation_report(a, "phantom", ablation.ablation_jobs(a), rows, [0], None, 20,
                                    60.0)
    # sample std (ddof 1) of 0.85, 0.95
    assert "| MetricUNet-R | 2 | 0.9000 ± 0.0707 | 0.9000 |" in text
    assert f"| MetricUNet-R | +0.1000 | {1 - 2 * math.atan(2) / math.pi:.3g} |" in text
    assert "| MetricUNet-R | 110 | +10.0 % | 110 |" in text


def test_ablation_runs_resumes_and_shares_stage1(phantom, tmp_path, monkeypatch):
    root, cache = phantom
    monkeypatch.setitem(train.PRESETS, "tiny", dict(width=0.125, stage1_filters=8, batch=8,
                                                    patches=8, stage1_patches=8, epochs1=1,
                                                    epochs2=1, phantom_cases=4))
    args = ["--data", str(root), "--cache", str(cache), "--preset", "tiny", "--rows", "UNet,R",
            "--folds", "2", "--workers", "0", "--runs", str(tmp_path / "runs"), "--results",
            str(tmp_path / "res")]
    ablation.ablation_main(args)
    name = f"{root.name}_tiny"  # a non-default preset names its own tables and runs
    with open(tmp_path / "res" / f"ablation_{name}_cases.csv") as f:
        cases = list(__import__("csv").DictReader(f))
    for row in ("UNet", "R"):  # 2 folds x 1 seed: every case tested once per row
        tested = sorted(r["image"] for r in cases if r["row"] == row)
        assert tested == sorted(c.name for c in data.find_cases(root))
    runs = tmp_path / "runs" / name
    for fold in (0, 1):  # both rows of a fold were scored through the same Stage 1
        s1 = [torch.load(runs / f"{r}-f{fold}-s0" / "stage1_best.pt", weights_only=True)["model"]
              for r in ("UNet", "R")]
        assert all(torch.equal(s1[0][k], s1[1][k]) for k in s1[0])
    stamp = (runs / "R-f1-s0" / "stage2_last.pt").stat().st_mtime_ns
    ablation.ablation_main(args)  # a second call finds every run done and retrains nothing
    assert (runs / "R-f1-s0" / "stage2_last.pt").stat().st_mtime_ns == stamp
    text = (tmp_path / "res" / f"ablation_{name}.md").read_text()
    assert "leave-one-out" not in text
    assert "2-fold cross-validation" in text and "MetricUNet-R" in text
    # Section I's claim measured on those runs: one row per (row, test case)
    ablation.ablation_main(args + ["--study", "embedding", "--results", str(tmp_path / "emb")])
    with open(tmp_path / "emb" / f"embedding_{name}_cases.csv") as f:
        emb = list(__import__("csv").DictReader(f))
    assert len(emb) == 2 * len(data.find_cases(root)) and {r["row"] for r in emb} == {"UNet", "R"}
    assert all(0 <= float(r["violations"]) <= 1 and float(r["fisher"]) >= 0 for r in emb)
    first = (tmp_path / "emb" / f"embedding_{name}_cases.csv").read_bytes()
    # again, from a cold cache (the data set moved, or another --cache): the same bytes
    ablation.ablation_main(args + ["--study", "embedding", "--results", str(tmp_path / "emb2"),
                                   "--cache", str(tmp_path / "cold-cache")])
    assert (tmp_path / "emb2" / f"embedding_{name}_cases.csv").read_bytes() == first


def test_stage1_from_refuses_a_stage1_trained_on_other_cases(phantom, tmp_path):
    root, cache = phantom
    s1 = tmp_path / "s1"
    train.main(["--data", str(root), "--cache", str(cache), "--out", str(s1), "--stage", "1",
                "--epochs1", "1", "--stage1-patches", "8", "--split-seed", "1", *TINY])
    with pytest.raises(SystemExit, match="other cases"):
        train.main(["--data", str(root), "--cache", str(cache), "--out", str(tmp_path / "s2"),
                    "--stage", "2", "--stage1-from", str(s1), "--epochs2", "1", "--patches", "8",
                    *TINY])


def test_ablation_overhead_is_a_median_over_runs():
    # UNet runs took 100, 100 and 400 s (one slowed by other work), R runs 110 s: the median says
    # +10 %, a mean would say -45 %.
    base = dict(DSC=0.9, ASD=1.0, SEN=0.9, PPV=0.9, HD95=2.0, HD=3.0, aRVD=5.0, fold="",
                empty_prediction=False)
    rows = [dict(base, row=row, seed=s, case=f"a/s{s}", train_s=t)
            for row, times in (("UNet", (100.0, 100.0, 400.0)), ("R", (110.0,) * 3))
            for s, t in enumerate(times)]
    a = ablation.parse_ablation_args(["--rows", "UNet,R"])
    text = ablation.ablation_report(a, "phantom", ablation.ablation_jobs(a), rows, [0, 1, 2], None,
                                    20, 60.0)
    assert "| UNet | 100 | +0.0 % | 400 |" in text
    assert "| MetricUNet-R | 110 | +10.0 % | 110 |" in text


def test_split_all_trains_on_every_case_and_keeps_the_last_epoch(phantom, tmp_path, capsys):
    root, cache = phantom
    out = tmp_path / "deploy"
    train.main(["--data", str(root), "--cache", str(cache), "--out", str(out), "--split", "all",
                "--stage", "1", "--epochs1", "2", "--stage1-patches", "16", *TINY])
    said = capsys.readouterr().out
    assert said.count("no validation split") == 1 and "nan" not in said   # said once, no NaN lines
    assert "stage 1 epoch 2/2 done" in said
    ck = torch.load(out / "stage1_best.pt", weights_only=True)
    names = sorted(c.name for c in data.find_cases(root))
    assert sorted(ck["dataset"]["train"]) == names
    assert ck["dataset"]["val"] == [] and ck["dataset"]["test"] == []
    assert ck["epoch"] == 1  # no validation: the last epoch is the one kept
    assert not (out / "stage1_test.csv").exists()             # nothing held out, nothing scored


def test_resume_never_rewrites_history(phantom, tmp_path):
    root, cache = phantom
    out = tmp_path / "run"
    args = ["--data", str(root), "--cache", str(cache), "--out", str(out), "--stage", "1",
            "--epochs1", "1", "--stage1-patches", "16", "--no-test", *TINY]
    train.main(args)
    log_before = (out / "log.csv").read_bytes()
    with pytest.raises(SystemExit, match=r"--batch 8 \(now 4\)"):  # another batch: another run
        train.main([*args, "--resume", "--batch", "4"])
    assert (out / "log.csv").read_bytes() == log_before


def test_stage1_from_a_corrupt_checkpoint_is_one_line(phantom, tmp_path, capsys):
    root, cache = phantom
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "stage1_best.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(SystemExit, match="not a valid or trusted train.py checkpoint"):
        train.main(["--data", str(root), "--cache", str(cache), "--out", str(tmp_path / "s2"),
                    "--stage", "2", "--stage1-from", str(bad), *TINY])


def test_stage2_without_a_stage1_says_why_the_test_split_is_skipped(phantom, tmp_path, capsys):
    root, cache = phantom
    train.main(["--data", str(root), "--cache", str(cache), "--out", str(tmp_path / "s2"),
                "--stage", "2", "--epochs2", "1", "--patches", "8", *TINY])
    assert "no Stage 1 in" in capsys.readouterr().out


FAKE_PEER = '''
import argparse, csv, os, sys
import nibabel as nib, numpy as np
p = argparse.ArgumentParser()
for f in ("--train-dir", "--folds", "--fold", "--minutes", "--threads", "--out"):
    p.add_argument(f)
a = p.parse_args()
cases = sorted(n[:-7] for n in os.listdir(os.path.join(a.train_dir, "labelsTr")))
name = cases[int(a.fold)::int(a.folds)][0]          # interleaved folds over the sorted cases
lab = nib.load(os.path.join(a.train_dir, "labelsTr", name + ".nii.gz"))
os.makedirs(a.out, exist_ok=True)
pred = (np.asarray(lab.dataobj) > 0).astype(np.uint8)
pred[0, 0, 0] = 1                                   # one stray voxel: a second piece
nib.save(nib.Nifti1Image(pred, lab.affine), os.path.join(a.out, name + "_pred.nii.gz"))
with open(os.path.join(a.out, "results.csv"), "w") as f:
    f.write("case,infer_s,train_s\\n%s,1.5,%s\\n" % (name, float(a.minutes) * 60))
'''


def test_baseline_study_scores_both_on_the_same_folds(phantom, tmp_path):
    """ablation.py --study baseline with a stand-in peer that returns the label plus one stray
    voxel: each case is tested once by both, the peer gets this project's median training time,
    and both are scored by metrics.py (the peer's DSC is 2|G| / (2|G| + 1), two pieces)."""
    root, cache = phantom
    peer = tmp_path / "peer.py"
    peer.write_text(FAKE_PEER)
    flags = "--epochs1 1 --epochs2 1 --stage1-patches 16 --patches 16 --width 0.125 " \
            "--stage1-filters 8 --batch 8 --log-every 50"
    ablation.ablation_main(["--study", "baseline", "--data", str(root), "--preset", "cpu",
                            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res"),
                            "--cache", str(cache), "--workers", "0", "--flags", flags,
                            "--peer", str(peer), "--peer-python", sys.executable])
    import csv
    rows = list(csv.DictReader(open(tmp_path / "res" / f"baseline_{root.name}_cpu_cases.csv")))
    names = sorted(c.name for c in data.find_cases(root))
    by = {m: sorted(r["case"] for r in rows if r["method"] == m) for m in
          ("cpu", "cpu + one piece", "peer")}
    assert by["cpu"] == by["cpu + one piece"] == by["peer"] == names
    ours = [float(r["train_s"]) for r in rows if r["method"] == "cpu"]
    for r in (r for r in rows if r["method"] == "peer"):
        gt = nib.load(str(root / "labelsTr" / f"{r['case']}.nii.gz")).get_fdata() > 0
        assert float(r["DSC"]) == pytest.approx(2 * gt.sum() / (2 * gt.sum() + 1))
        assert int(r["pieces"]) == 2
        assert float(r["train_s"]) == pytest.approx(np.median(ours), abs=0.01 * 60)
    for r in (r for r in rows if r["method"] == "cpu + one piece"):
        assert int(r["pieces"]) <= 1
    table = (tmp_path / "res" / f"baseline_{root.name}_cpu.md").read_text()
    assert "| peer |" in table and "Post-processing decided on the pooled folds" in table


def test_a_run_decides_its_postprocessing_on_validation_and_infer_follows_it(phantom, tmp_path):
    """--postprocess decide on a 70/10/20 run: postprocessing.json holds the validation case's
    evidence and the rule's decision; infer.py applies it by default (and says so), and
    --no-one-piece gives the raw mask, of which the default one is a subset."""
    import shutil
    root, cache = phantom
    run = tmp_path / "run"
    train.main(["--data", str(root), "--cache", str(cache), "--out", str(run), "--preset", "cpu",
                "--epochs1", "1", "--epochs2", "1", "--stage1-patches", "16", "--patches", "32",
                "--no-test", *TINY])
    got = json.loads((run / infer.POSTPROCESSING).read_text())
    [ev] = got["evidence"]
    assert got["decided_on"] == "the validation split"
    assert ev["case"] == torch.load(run / "stage2_best.pt", weights_only=True)["dataset"]["val"][0]
    assert got["one_piece"] == (ev["dsc_one_piece"] >= ev["dsc_raw"])
    # the decision file says keep: infer.py follows it; a flag overrides it
    (run / infer.POSTPROCESSING).write_text(json.dumps(dict(got, one_piece=True)))
    item = [("phantom_001", root / "imagesTr" / "phantom_001.nii.gz", 0)]
    said = []
    [kept] = infer.run(run, item, tmp_path / "kept", log=said.append)
    [raw] = infer.run(run, item, tmp_path / "raw", one_piece=False, log=lambda *a: None)
    assert any("keeps the piece at the" in s for s in said)
    k, r = (np.asarray(nib.load(str(p)).dataobj) > 0 for p in (kept, raw))
    assert not (k & ~r).any() and data.pieces(k) <= max(data.pieces(r), 1)
