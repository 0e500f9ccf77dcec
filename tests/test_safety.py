"""Nothing lost, nothing silent: every write refuses to replace a file or to land in an input data
folder unless asked, geometry comes from the affine, and every user error is one line, not a
traceback. Each test reproduces one reported fault; most use tiny hand-made NIfTI files, so no
training is needed."""
import csv
import json
import math
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import bench
import data
import figures
import infer
import metrics
import phantom
import train


def save(path, arr, aff=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr),
                             np.diag([1.0, 1.0, 1.0, 1.0]) if aff is None else aff), str(path))


def box_mask(shape=(20, 20, 10), lo=(5, 6, 2), hi=(14, 15, 8)):
    m = np.zeros(shape, np.uint8)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return m


@pytest.fixture
def decathlon(tmp_path):
    """A Decathlon-layout data set of two cases: images, labels and dataset.json."""
    root = tmp_path / "Task"
    for c in ("a", "b"):
        save(root / "imagesTr" / f"{c}.nii.gz", (box_mask() * 100).astype(np.int16))
        save(root / "labelsTr" / f"{c}.nii.gz", box_mask())
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "T2"}}))
    return root


def snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


# ------------------------------------------------------------------ data loss

def test_infer_never_writes_into_the_data_sets_label_folder(decathlon, tmp_path, capsys):
    before = snapshot(decathlon)
    assert infer.main([str(tmp_path / "no-run"), str(decathlon), str(decathlon / "labelsTr")]) == 2
    err = capsys.readouterr().err
    assert "input folder" in err and "Traceback" not in err
    assert snapshot(decathlon) == before


def test_infer_refuses_to_replace_an_existing_prediction(decathlon, tmp_path, capsys):
    out = tmp_path / "out"
    save(out / "a.nii.gz", box_mask())
    kept = (out / "a.nii.gz").read_bytes()
    assert infer.main([str(tmp_path / "no-run"), str(decathlon), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "a.nii.gz").read_bytes() == kept


def test_metrics_csv_never_replaces_a_prediction_or_a_report(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save(gt / "case_0.nii.gz", box_mask())
    save(pred / "case_0.nii.gz", box_mask())
    kept = (pred / "case_0.nii.gz").read_bytes()
    assert metrics.main([str(pred), str(gt), "--csv", str(pred / "case_0.nii.gz")]) == 2
    assert "input folder" in capsys.readouterr().err
    assert (pred / "case_0.nii.gz").read_bytes() == kept
    report = tmp_path / "r.csv"
    report.write_text("mine")
    assert metrics.main([str(pred), str(gt), "--csv", str(report)]) == 2
    assert "--overwrite" in capsys.readouterr().err and report.read_text() == "mine"
    assert metrics.main([str(pred), str(gt), "--csv", str(report), "--overwrite"]) == 0
    assert report.read_text().startswith("case,")


# ------------------------------------------------------------------ silent wrong results

def stale_pixdim_file(path, arr, aff):
    """A NIfTI whose affine says `aff` while its header's pixdim says 1 x 1 x 1 mm (as some
    converters write)."""
    hdr = nib.Nifti1Image(arr, aff).header.copy()
    hdr["pixdim"][1:4] = 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, None, header=hdr), str(path))
    assert nib.load(str(path)).header.get_zooms()[:3] == (1.0, 1.0, 1.0)


def test_spacing_comes_from_the_affine_not_pixdim(tmp_path):
    aff = np.diag([1.21, 1.21, 2.0, 1.0])
    stale_pixdim_file(tmp_path / "img.nii.gz", (box_mask() * 100).astype(np.int16), aff)
    stale_pixdim_file(tmp_path / "lab.nii.gz", box_mask(), aff)
    _, _, geo = data.load_case(data.Case("c", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"))
    assert np.allclose(geo.spacing, (1.21, 1.21, 2.0), atol=1e-5)
    _, _, spacing = metrics.load_mask(tmp_path / "lab.nii.gz")
    assert np.allclose(spacing, (1.21, 1.21, 2.0), atol=1e-5)
    # a rotated affine: the voxel size is the length of each column, here 0.8, 0.8 and 3 mm
    c, s = math.cos(0.5), math.sin(0.5)
    rot = np.array([[0.8 * c, -0.8 * s, 0, 0], [0.8 * s, 0.8 * c, 0, 0], [0, 0, 3.0, 0],
                    [0, 0, 0, 1]])
    assert np.allclose(metrics.spacing_from_affine(rot), (0.8, 0.8, 3.0))


def test_metrics_refuses_the_ground_truth_as_prediction(decathlon, capsys):
    assert metrics.main([str(decathlon / "labelsTr"), str(decathlon)]) == 2
    assert "ground-truth folder itself" in capsys.readouterr().err


def test_empty_ground_truth_gives_strict_json_and_no_warning(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save(gt / "a.nii.gz", box_mask())
    save(gt / "b.nii.gz", np.zeros((20, 20, 10), np.uint8))            # empty ground truth
    save(pred / "a.nii.gz", box_mask())
    save(pred / "b.nii.gz", box_mask())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning fails the test
        assert metrics.main([str(pred), str(gt), "--csv", str(tmp_path / "r.csv")]) == 0
    text = (tmp_path / "r.summary.json").read_text()
    s = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert s["aRVD"]["mean"] == 0.0 and s["aRVD"]["n"] == 1 and s["DSC"]["n"] == 2


def test_resume_keeps_each_logged_step_once(tmp_path):
    log = metrics.CsvLog(tmp_path / "log.csv", resume=False)
    log.write([dict(stage=1, epoch=1, step=s, loss=0.1)
               for s in (1, 2)] + [dict(stage=1, epoch=1, step=2, val_dsc=0.5)])
    log.write([dict(stage=2, epoch=1, step=s, loss=0.2)
               for s in range(1, 4)] + [dict(stage=2, epoch=1, step=3, val_dsc=0.7)])
    # epoch 2: killed before its end
    log.write([dict(stage=2, epoch=2, step=s, loss=0.2) for s in (4, 5)])
    again = metrics.CsvLog(tmp_path / "log.csv", resume=True)
    again.truncate_after(2, 1)  # the checkpoint holds epoch 1
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [(r["stage"], r["step"]) for r in rows] == [("1", "1"), ("1", "2"), ("1", "2"),
                                                       ("2", "1"), ("2", "2"), ("2", "3"),
                                                       ("2", "3")]


def test_one_message_when_no_centre_is_found():
    said = []
    c = infer.prostate_centre(None, None, (10, 20, 30), log=said.append, name="x")
    assert np.allclose(c, (4.5, 9.5, 14.5)) and len(said) == 1
    import inspect
    assert "falling back" not in inspect.getsource(data.preprocess)


# ------------------------------------------------------------------ one line, not a traceback

class Payload:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize("kind", ["truncated", "garbage", "code"])
def test_bad_checkpoint_is_one_line_and_never_runs_code(decathlon, tmp_path, capsys, kind):
    run = tmp_path / "run"
    run.mkdir()
    for stage in (1, 2):
        path = run / f"stage{stage}_best.pt"
        if kind == "code":
            torch.save({"args": Payload()}, path)
        else:
            torch.save({"model": {"w": torch.zeros(3)}, "args": {}}, path)
            b = path.read_bytes()
            path.write_bytes(b[: len(b) // 2] if kind == "truncated" else b"\x00garbage" * 20)
    assert infer.main([str(run), str(decathlon / "imagesTr" / "a.nii.gz"),
                       str(tmp_path / "out")]) == 2
    out = capsys.readouterr()
    assert "not a valid or trusted train.py checkpoint" in out.err
    assert "weights_only=False" not in out.err
    assert "this ran" not in out.out and "Traceback" not in out.err


def test_resume_with_another_width_changes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = vars(train.parse_args(["--preset", "cpu", "--width", "0.125", "--out", str(run)]))
    torch.save({"args": old}, run / "stage2_last.pt")
    (run / "args.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "cpu", "--width", "0.25", "--out", str(run), "--resume"])
    assert "--width 0.125 (now 0.25)" in str(e.value)
    assert json.loads((run / "args.json").read_text())["width"] == 0.125


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--batch", "-3"], ["--width", "0"],
                                  ["--epochs2", "-1"], ["--workers", "-1"]])
def test_train_rejects_non_positive_numbers(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and "must be" in capsys.readouterr().err


def test_train_refuses_a_file_as_out_or_cache(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for flag in ("--out", "--cache"):
        with pytest.raises(SystemExit) as e:
            out = ["--out", str(tmp_path / "r")] if flag == "--cache" else []
            train.main(["--preset", "cpu", flag, str(f)] + out)
        assert "is a file" in str(e.value)
    assert f.read_text() == "x"


def test_train_unwritable_run_folder_is_one_line(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    # as a read-only folder would (we run as root)
    monkeypatch.setattr(data, "atomic_write_text", refuse)
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "cpu", "--out", str(tmp_path / "r")])
    assert "cannot write the run folder" in str(e.value) and "Permission denied" in str(e.value)


def test_cli_argument_errors_exit_cleanly(tmp_path, capsys):
    for argv in (["model", "--repeats", "0"], ["model", "--width", "0"],
                 ["model", "--config", "XYZ"]):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            infer.main([str(tmp_path), str(tmp_path), str(tmp_path / "o"), "--device", "cuda"])
        assert e.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err
    f = tmp_path / "afile"
    f.write_text("x")
    assert phantom.main([str(f)]) == 2 and f.read_text() == "x"


@pytest.mark.parametrize("n", ["0", "-3"])
def test_phantom_needs_at_least_one_case(tmp_path, n, capsys):
    assert phantom.main([str(tmp_path / "ph"), "--cases", n]) == 2
    assert "--cases" in capsys.readouterr().err and not (tmp_path / "ph").exists()


# ------------------------------------------------------------------ real data sets

def test_promise12_naming(tmp_path):
    folder = tmp_path / "promise"
    save(folder / "Case00.nii.gz", (box_mask() * 100).astype(np.int16))
    save(folder / "Case00_segmentation.nii.gz", box_mask())
    # label not segmented
    assert infer.list_inputs(folder) == [("Case00", folder / "Case00.nii.gz", 0)]
    assert metrics.nifti_files(folder, "gt") == {"Case00": folder / "Case00_segmentation.nii.gz"}
    pred = tmp_path / "pred"
    save(pred / "Case00.nii.gz", box_mask())
    rows = metrics.evaluate_folders(pred, folder, log=lambda *_: None)
    assert rows[0]["case"] == "Case00" and rows[0]["DSC"] == 1.0
    mhd = tmp_path / "mhd"
    mhd.mkdir()
    (mhd / "Case00.mhd").write_text("ObjectType = Image")
    with pytest.raises(FileNotFoundError, match="NIfTI only"):
        infer.list_inputs(mhd)


def test_named_channel_on_a_3d_file_outside_a_data_set(tmp_path):
    save(tmp_path / "t2.nii.gz", (box_mask() * 100).astype(np.int16))
    said = []
    assert infer.resolve_channel(tmp_path / "t2.nii.gz", "T2", log=said.append) == 0
    assert "single channel" in said[0]


def test_compare_checks_every_folder_before_any_work(tmp_path, capsys):
    gt, p1, p2 = tmp_path / "gt", tmp_path / "p1", tmp_path / "p2"
    for c in ("a", "b"):
        save(gt / f"{c}.nii.gz", box_mask())
        save(p1 / f"{c}.nii.gz", box_mask())
    save(p2 / "a.nii.gz", box_mask())                                     # p2 lacks case b
    assert metrics.main([str(p1), str(gt), "--compare", str(p2), "--csv",
                         str(tmp_path / "r.csv")]) == 2
    out = capsys.readouterr()
    assert "no prediction for case(s) b" in out.err and "DSC" not in out.out
    assert not (tmp_path / "r.csv").exists()


def test_coarse_slices_are_warned_about(tmp_path, capsys):
    save(tmp_path / "img.nii.gz", (box_mask() * 100).astype(np.int16),
         np.diag([0.8, 0.8, 50.0, 1.0]))
    data.load_case(data.Case("c", tmp_path / "img.nii.gz", None), need_label=False)
    err = capsys.readouterr().err
    assert "warning" in err and "50.0" in err and "6 mm" in err


def test_metrics_unwritable_report_is_one_line(tmp_path, monkeypatch, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save(gt / "a.nii.gz", box_mask())
    save(pred / "a.nii.gz", box_mask())

    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))
    # as a read-only folder would (we run as root)
    monkeypatch.setattr(data, "atomic_write_text", refuse)
    assert metrics.main([str(pred), str(gt), "--csv", str(tmp_path / "ro" / "r.csv")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Permission denied" in err and "Traceback" not in err


# ------------------------------------------------------------------ pictures and ablation.py

def test_png_writer_decodes_to_the_same_pixels(tmp_path):
    """Our PNG, decoded by hand with zlib and struct (chunks, CRCs, filter bytes), gives back the
    pixels."""
    import struct
    import zlib
    rgb = (np.random.default_rng(0).random((7, 11, 3)) * 255).astype(np.uint8)
    figures.write_png(tmp_path / "x.png", rgb)
    b = (tmp_path / "x.png").read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(b):
        n = struct.unpack(">I", b[pos:pos + 4])[0]
        kind, body = b[pos + 4:pos + 8], b[pos + 8:pos + 8 + n]
        crc = struct.unpack(">I", b[pos + 8 + n:pos + 12 + n])[0]
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = body
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (w, h, depth, colour) == (11, 7, 8, 2) and b"IEND" in chunks
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(7, 1 + 11 * 3)
    assert (rows[:, 0] == 0).all()                                     # filter type 0 on every row
    assert np.array_equal(rows[:, 1:].reshape(7, 11, 3), rgb)


@pytest.mark.parametrize("argv", [["--rows", "UNet,XYZ"], ["--preset", "nope"],
                                  ["--study", "other"]])
def test_ablation_argument_errors(argv, capsys):
    import ablation
    with pytest.raises(SystemExit) as e:
        ablation.parse_ablation_args(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def _figure_csvs(folder: Path):
    """Small ablation and sensitivity CSVs in the layout ablation.py writes."""
    import metrics
    cases = [dict(DSC=0.8 + 0.05 * i + 0.02 * c, ASD=3.0 - i, HD95=9.0, HD=12.0, SEN=0.9, PPV=0.9,
                  aRVD=5.0, case=f"c{c}/s0", image=f"c{c}", row=row, seed=0, fold="",
                  empty_prediction=False, train_s=10.0) for i, row in enumerate(["UNet", "R"])
             for c in range(3)]
    metrics.write_csv(folder / "ablation_toy_cases.csv", cases)
    conv = [dict(row=row, seed=0, fold="", epoch=1 + s // 15, step=s, ce=1.0 / s, loss=1.0 / s,
                 val_dsc="") for row in ["UNet", "R"] for s in range(1, 31)]
    conv += [dict(row=row, seed=0, fold="", epoch=e, step=15 * e, ce="", loss="",
                  val_dsc=0.5 + 0.1 * e) for row in ["UNet", "R"] for e in (1, 2)]
    metrics.write_csv(folder / "ablation_toy_convergence.csv", conv)
    sens = [dict(r, row=lab) for lab in ["R", "R lam=0.1", "R sigma=0.3", "R k=50"]
            for r in cases[3:]]
    metrics.write_csv(folder / "sensitivity_toy_cases.csv", sens)


def test_figures_are_png_files_and_reproducible(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import struct
    _figure_csvs(tmp_path)
    figures.main(["--results", str(tmp_path)])
    names = ["ablation_toy_table3.png", "ablation_toy_fig7.png", "sensitivity_toy_fig6.png"]
    first = {n: (tmp_path / n).read_bytes() for n in names}
    for n, b in first.items():
        assert b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR"
        w, h = struct.unpack(">II", b[16:24])
        assert 500 < w < 1000 and 250 < h < 500 and len(b) < 300_000      # small enough to commit
    figures.main(["--results", str(tmp_path)])
    assert all((tmp_path / n).read_bytes() == b for n, b in first.items())   # same CSVs, same bytes
    assert "wrote" in capsys.readouterr().out


def test_figures_errors_are_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="no ablation_"):
        figures.main(["--results", str(tmp_path)])           # nothing to draw from (checked first)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    _figure_csvs(tmp_path)
    with pytest.raises(SystemExit, match="needs matplotlib"):
        figures.main(["--results", str(tmp_path)])


def test_infer_allows_a_subfolder_next_to_a_single_scan_but_not_beside_it(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    save(scan, (box_mask() * 100).astype(np.int16))
    prot = infer.protected_folders([scan])
    infer.check_output_folder(tmp_path / "out", prot)  # ./out next to ./scan.nii.gz is fine
    with pytest.raises(ValueError, match="input folder"):
        infer.check_output_folder(tmp_path, prot)                       # beside the scan is not


# ------------------------------------------------------------ names, channels, ground truth, inputs

def test_overwrite_never_replaces_the_ground_truth(decathlon, tmp_path, capsys):
    labels = decathlon / "labelsTr"
    before = snapshot(decathlon)
    for extra in (["--overwrite"], []):
        rc = infer.main([str(tmp_path / "no-run"), str(decathlon / "imagesTr"), str(labels), "--gt",
                         str(labels), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "input folder" in err and "--overwrite" not in err
    gt_elsewhere = tmp_path / "gt"  # a ground-truth folder outside any data set
    save(gt_elsewhere / "a.nii.gz", box_mask())
    # pictures into the labels: no
    assert infer.main([str(tmp_path / "no-run"), str(decathlon / "imagesTr"), str(tmp_path / "o"),
                       "--png", str(gt_elsewhere), "--gt", str(gt_elsewhere)]) == 2
    assert "input folder" in capsys.readouterr().err
    assert snapshot(decathlon) == before and sorted(p.name
                                                    for p in gt_elsewhere.iterdir()) == ["a.nii.gz"]


def test_two_inputs_with_one_output_name_are_refused(tmp_path, capsys):
    for name in ("scan.nii", "scan.nii.gz"):
        save(tmp_path / "in" / name, (box_mask() * 100).astype(np.int16))
    assert infer.main([str(tmp_path / "no-run"), str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "scan.nii and" in err and "scan.nii.gz would both be written" in err
    assert not (tmp_path / "out").exists()


def test_case_ids_ending_in_four_digits_are_cases(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for i in (1, 2, 3):
        save(gt / f"pat_{i:04d}.nii.gz", box_mask())
        save(pred / f"pat_{i:04d}.nii.gz", box_mask(lo=(5, 6, 2 + i)))
    rows = metrics.evaluate_folders(pred, gt, log=lambda *_: None)
    assert [r["case"] for r in rows] == ["pat_0001", "pat_0002", "pat_0003"]
    # by hand: the prediction box starts i slices later and ends with the label's: 6 - i slices, all
    # inside
    assert [r["DSC"] for r in rows] == pytest.approx([2 * (6 - i) / (6 + 6 - i) for i in (1, 2, 3)])
    root = tmp_path / "decathlon"                             # Decathlon images named pat_0001, ...
    for i in (1, 2, 3):
        save(root / "imagesTr" / f"pat_{i:04d}.nii.gz", (box_mask() * 100).astype(np.int16))
        save(root / "labelsTr" / f"pat_{i:04d}.nii.gz", box_mask())
    assert [c.name for c in data.find_cases(root)] == ["pat_0001", "pat_0002", "pat_0003"]
    with pytest.raises(ValueError, match="none of the cases"):  # an empty test split is an error
        metrics.evaluate_folders(pred, gt, only=["pat_0009"], log=lambda *_: None)


def test_nnunet_channels_follow_one_rule(tmp_path):
    root = tmp_path / "nnunet"
    for case in ("pp_0001", "pp_0002"):  # case ids ending in four digits, two channels
        for ch in (0, 1):
            save(root / "imagesTr" / f"{case}_{ch:04d}.nii.gz",
                 (box_mask() * (10 + ch)).astype(np.int16))
        save(root / "labelsTr" / f"{case}.nii.gz", box_mask())
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"}}))
    for channel, suffix in (("0", "_0000"), ("T2", "_0000"), ("ADC", "_0001"), ("1", "_0001")):
        cases = data.find_cases(root, channel)
        assert [c.name for c in cases] == ["pp_0001", "pp_0002"]
        assert all(c.image.name == f"{c.name}{suffix}.nii.gz" and c.label.name == f"{c.name}.nii.gz"
                   for c in cases)
        items = infer.list_inputs(root, channel)              # inference reads the same files
        assert [(n, p.name) for n, p, _ in items] == [(c.name, c.image.name) for c in cases]
    with pytest.raises(data.DataError, match="no channel 2 file"):
        data.find_cases(root, "2")


def test_an_image_is_not_a_mask(decathlon, tmp_path, capsys):
    pred = tmp_path / "pred"
    for p in (decathlon / "imagesTr").iterdir():  # the scans themselves, given as predictions
        img = nib.load(str(p))
        save(pred / p.name, np.asarray(img.dataobj) - 1000, img.affine)
    assert metrics.main([str(pred), str(decathlon)]) == 2
    err = capsys.readouterr().err
    assert "not a label mask" in err and err.count("\n") == 1


def test_zero_spacing_names_the_file(tmp_path):
    save(tmp_path / "pred" / "a.nii", box_mask())
    save(tmp_path / "gt" / "a.nii", box_mask())
    # nibabel will not write it: patch the header
    raw = bytearray((tmp_path / "gt" / "a.nii").read_bytes())
    raw[280:296] = np.zeros(4, np.float32).tobytes()             # srow_x: the sform's x column is 0
    raw[252:256] = np.array([0, 2], np.int16).tobytes()  # qform_code 0, sform_code 2: sform rules
    (tmp_path / "gt" / "a.nii").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"gt/a\.nii: voxel spacing \[0\.0, 1\.0, 1\.0\] mm"):
        metrics.evaluate_folders(tmp_path / "pred", tmp_path / "gt", log=lambda *_: None)


def test_nan_affine_is_said():
    bad = np.diag([1.0, 1.0, 1.0, 1.0])
    bad[0, 3] = np.nan
    assert "NaN" in data.affine_mismatch(bad, bad)
    a, b = np.eye(4), np.eye(4)
    b[:3, 3] = (3.0, 4.0, 0.0)                                   # origin moved by a 3-4-5 triangle
    assert data.affine_mismatch(a, b) == ("grids differ: voxel size by 0 mm, origin by 5 mm, "
                                          "axis direction by 0 degrees")
    assert data.affine_mismatch(a, a) is None


def test_data_cache_inside_the_data_set_is_refused(decathlon, capsys):
    before = snapshot(decathlon)
    assert data.main([str(decathlon), "--cache", str(decathlon / "cache")]) == 2
    assert "inside the data set" in capsys.readouterr().err and snapshot(decathlon) == before


def test_ablation_checks_its_outputs_before_any_work(tmp_path):
    import ablation
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="cannot write into"):
        ablation.ablation_main(["--data", str(tmp_path / "missing"), "--results",
                                str(tmp_path / "afile"), "--runs", str(tmp_path / "runs")])
    assert (tmp_path / "afile").read_text() == "x"


def test_ctrl_c_is_one_line(tmp_path):
    import signal
    import subprocess
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "phantom.py", str(tmp_path / "ph"), "--cases", "50"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # inside main, writing
    while proc.poll() is None and not (tmp_path / "ph" / "imagesTr").exists():
        pass
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.strip().startswith("interrupted:")
    assert "Traceback" not in err


def test_fig5_draws_what_the_real_samplers_return(tmp_path):
    """figures.sampler_tuples are metricunet's own draws (same seed, Table II's order); the picture
    is a valid PNG drawn from them, and an existing one is never replaced without --overwrite."""
    import torch
    import metricunet as M
    lab = box_mask((64, 64, 1), (20, 16, 0), (44, 40, 1))[..., 0]
    probs = figures.stand_in_probability(lab)
    got = figures.sampler_tuples(lab, probs, seed=3)
    g = torch.Generator().manual_seed(3)
    want = {"random": M.random_sampler(torch.from_numpy(lab).long()[None], 20, 1, g),
            "hard": M.focal_hard_negative_sampler(torch.from_numpy(lab).long()[None],
                                                  torch.from_numpy(probs)[None], 20, 1, 0.1, g),
            "contour": M.contour_aware_sampler(torch.from_numpy(lab).long()[None], 20, 1, g)}
    for name in want:
        assert all(torch.equal(a, b) for a, b in zip(got[name], want[name])), name
    # the stand-in misses the label somewhere, so Eq. 1 has hard anchors, all inside the prostate
    anchors = got["hard"][0][0].numpy()
    assert bool(got["hard"][3].all()) and lab.ravel()[anchors].all()
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig5.png"
    path = figures.samplers_figure(figures.pyplot(), lab * 200.0, lab, probs, got, out, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        figures.samplers_main(["--out", str(out)])


def test_embedding_study_names_an_unreadable_case_in_one_line(tmp_path):
    import ablation
    root = tmp_path / "set"
    for c in ("a", "b", "c"):
        save(root / "imagesTr" / f"{c}.nii.gz", (box_mask() * 100).astype(np.int16))
        save(root / "labelsTr" / f"{c}.nii.gz", box_mask())
    (root / "imagesTr" / "b.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(SystemExit) as e:
        ablation.ablation_main(["--data", str(root), "--study", "embedding",
                                "--cache", str(tmp_path / "cache"), "--runs", str(tmp_path / "r"),
                                "--results", str(tmp_path / "res")])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert "b.nii.gz" in str(e.value) and "cannot read NIfTI" in str(e.value)
