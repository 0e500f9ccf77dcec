"""train.py and infer.py end to end on a small phantom: DDP, resume, inference geometry, learning."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import data
import infer
import metricunet as M
import train

ROOT = Path(__file__).resolve().parents[1]
MSD = ROOT.parent / "shared" / "data" / "msd-prostate-subset"
TINY = ["--width", "0.125", "--stage1-filters", "8", "--batch", "8", "--workers", "0", "--log-every", "5"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe")
    root = data.make_phantom(base / "phantom", cases=4, seed=11, log=None)
    data.prepare_cases(data.find_cases(root), base / "cache", log=None)       # warm the shared cache
    return root, base / "cache"


def run_py(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def trained_run(phantom, tmp_path_factory):
    """A short two-stage training (no test-split inference), shared by the inference tests."""
    root, cache = phantom
    out = tmp_path_factory.mktemp("run") / "run"
    train.main(["--data", str(root), "--cache", str(cache), "--out", str(out), "--no-test", "--epochs1", "2",
                "--epochs2", "4", "--stage1-patches", "48", "--patches", "128", "--fg-fraction", "0.5", "--lr", "0.03",
                *TINY])
    return out


def test_ddp_two_ranks(phantom, tmp_path):
    root, cache = phantom
    probe, out = tmp_path / "probe", tmp_path / "run"
    probe.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        "tests/ddp_probe.py", "--data", str(root), "--cache", str(cache), "--out", str(out),
                        "--stage", "2", "--epochs2", "1", "--patches", "24", "--no-test", *TINY],
                       cwd=ROOT, env=dict(os.environ, PROBE_DIR=str(probe), OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r0, r1 = (json.loads((probe / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["params"] == r1["params"]                                  # identical after all-reduce
    assert r0["seen"] and r1["seen"] and not set(r0["seen"]) & set(r1["seen"])   # different samples
    assert r0["written"] and r1["written"] == []                          # only rank 0 wrote
    assert (out / "stage2_last.pt").exists()


def test_resume_after_a_crash_matches_an_uninterrupted_run(phantom, tmp_path):
    root, cache = phantom
    common = ["train.py", "--data", str(root), "--cache", str(cache), "--stage", "2", "--epochs2", "2",
              "--patches", "16", "--no-test", *TINY]
    full = run_py(common + ["--out", str(tmp_path / "a")], timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = run_py(common + ["--out", str(tmp_path / "b"), "--halt-after-epoch", "1"], timeout=300)
    assert crashed.returncode == 3
    again = run_py(common + ["--out", str(tmp_path / "b")], timeout=300)     # refuses to clobber the run
    assert again.returncode != 0 and "--resume" in again.stderr
    resumed = run_py(common + ["--out", str(tmp_path / "b"), "--resume"], timeout=300)
    assert resumed.returncode == 0 and "resumed after epoch 1" in resumed.stdout, resumed.stderr[-3000:]
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
        crops.append((data.crop_around(preps[n].image, c)[0], data.crop_around(preps[n].label, c)[0]))
    trained = M.build_model("HCP", width=0.125)
    trained.load_state_dict(ck["model"])
    torch.manual_seed(0)
    untrained = M.build_model("HCP", width=0.125)
    dev = torch.device("cpu")
    d_trained = train.validate_stage2(trained.eval(), crops, dev, False)[0]
    d_untrained = train.validate_stage2(untrained.eval(), crops, dev, False)[0]
    assert d_trained > d_untrained + 0.4, (d_trained, d_untrained)


def test_inference_keeps_shape_and_affine_anisotropic_phantom(phantom, trained_run, tmp_path):
    root, _ = phantom
    src = root / "imagesTr" / "phantom_001.nii.gz"                  # stored LPS, anisotropic spacing
    out = tmp_path / "pred"
    infer.run(trained_run, [src], out, save_prob=True, log=lambda *a: None)
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


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(phantom, tmp_path, monkeypatch):
    root, cache = phantom
    calls = {"n": 0}
    real = M.total_loss

    def poisoned(*a, **k):                      # finite in epoch 1 (3 steps), NaN from the 5th step on
        loss, parts = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] >= 5 else (loss, parts)

    monkeypatch.setattr(train.M, "total_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="NaN or infinite at step 5"):
        train.main(["--data", str(root), "--cache", str(cache), "--out", str(out), "--stage", "2", "--epochs2", "3",
                    "--patches", "12", "--no-test", *TINY])
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
        train.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--cache", str(cache)])
    assert sorted(str(p) for p in root.rglob("*")) == before
