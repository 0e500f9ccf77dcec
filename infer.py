"""Segment the prostate in new images with a trained two-stage MetricUNet (Sections III-A, IV-B).

    python infer.py RUN_DIR INPUT OUTPUT_DIR [--save-prob] [--channel T2] [--largest-component]

INPUT is a NIfTI file or a folder of them (a Decathlon/nnU-Net root's imagesTr/ is used). For each image:
  body crop + 1 mm + [0, 255] (Section IV-B, data.preprocess)
  -> 1/4 size -> Stage 1 on whole slices (Section III-A)
  -> prostate centre = mean of the femoral-head reference centre and the Stage-1 centre (Section III-A)
  -> 128^3 crop at 1 mm -> Stage 2 on whole slices, no patch voting (Section IV-B)
  -> probability mapped back onto the input's own grid -> OUTPUT_DIR/CASE.nii.gz (uint8 mask, the input's
     affine and shape); with --save-prob also CASE_prob.nii.gz (float32 heatmap, Fig. 1).
It never writes into the input's folder and never overwrites an input file.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import data
import metricunet as M


def load_models(run_dir, device):
    """The best Stage-1 and Stage-2 checkpoints of a run (weights_only: no pickle code is executed)."""
    run = Path(run_dir)
    models = []
    for stage in (1, 2):
        path = run / f"stage{stage}_best.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run} a finished train.py run folder?")
        ck = torch.load(path, map_location=device, weights_only=True)
        a = ck["args"]
        model = (M.LightUNet(in_channels=5, filters=a["stage1_filters"]) if stage == 1
                 else M.build_model(a["config"], in_channels=3, width=a["width"]))
        model.load_state_dict(ck["model"])
        models.append(model.to(device).eval())
    return models[0], models[1], ck["args"]


@torch.no_grad()
def predict_volume(model, volume_u8, n_slices, device, chunk=8, amp=False):
    """Whole-slice inference without patch voting (Section IV-B): prostate probability, same shape."""
    x = data.slices_25d(volume_u8, n_slices)
    out = np.empty((x.shape[0],) + x.shape[2:], np.float32)
    for i in range(0, len(x), chunk):
        xb = torch.from_numpy(x[i:i + chunk]).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits, _ = model(xb)
        out[i:i + chunk] = torch.softmax(logits.float(), 1)[:, 1].cpu().numpy()
    X, Y, _ = volume_u8.shape
    return out[:, :X, :Y].transpose(1, 2, 0)


def stage1_centre(prob_quarter: np.ndarray):
    """Section III-A: "the rough predicted prostate center is determined by the coarse prostate segmentation".
    Paper is silent on stray voxels: we take the centroid of the largest connected component, in 1-mm voxels."""
    mask = prob_quarter > 0.5
    if not mask.any():
        return None
    return np.argwhere(data.largest_component(mask)).mean(0) * data.STAGE1_FACTOR


def prostate_centre(reference, predicted, shape, log=print, name=""):
    """Section III-A: "The prostate centroid is calculated by an average of the reference prostate center and
    rough predicted prostate center." Either one alone if the other is missing; the volume centre if neither."""
    if reference is not None and predicted is not None:
        return (np.asarray(reference) + np.asarray(predicted)) / 2
    if predicted is not None:
        return np.asarray(predicted)
    if reference is not None:
        log(f"  {name}: Stage 1 found no prostate; using the femoral-head reference centre alone")
        return np.asarray(reference)
    log(f"  {name}: no Stage-1 prostate and no reference centre; using the centre of the body crop")
    return (np.asarray(shape) - 1) / 2


def segment(prep: data.Prepared, stage1, stage2, device, log=print, largest_component=False):
    """One preprocessed case -> (prostate probability on the 1-mm body crop, centre used)."""
    img1, _ = data.stage1_pair(prep)
    p1 = predict_volume(stage1, img1, 5, device)
    centre = prostate_centre(prep.meta["reference_centre"], stage1_centre(p1), prep.image.shape, log, prep.name)
    crop, start = data.crop_around(prep.image, centre, data.CROP_SIZE)
    p2 = predict_volume(stage2, crop, 3, device)
    if largest_component:                      # optional; the paper uses no post-processing
        keep = data.largest_component(p2 > 0.5)
        p2 = np.where(keep | (p2 <= 0.5), p2, 0.0)
    prob = np.zeros(prep.image.shape, np.float32)
    src = tuple(slice(max(s, 0), min(s + data.CROP_SIZE, n)) for s, n in zip(start, prep.image.shape))
    dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start))
    prob[src] = p2[dst]
    return prob, centre


def output_path(out_dir: Path, case: str, suffix: str = "") -> Path:
    return out_dir / f"{case}{suffix}.nii.gz"


def save_like(array, reference_img, path: Path, dtype):
    """NIfTI with the input's affine and its sform/qform codes; written to a temporary name, then renamed."""
    import nibabel as nib
    hdr = reference_img.header.copy()
    img = nib.Nifti1Image(array.astype(dtype), reference_img.affine, hdr)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1, 0)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)


def list_inputs(inp: Path):
    if inp.is_dir():
        folder = inp / "imagesTr" if (inp / "imagesTr").is_dir() else inp
        files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"no NIfTI files in {folder}")
        return files
    if not inp.is_file():
        raise FileNotFoundError(f"{inp}: no such file or folder")
    return [inp]


def run(run_dir, inputs, out_dir, channel="0", device=None, save_prob=False, largest_component=False, log=print):
    """Segment every input file into out_dir; returns the written mask paths."""
    import nibabel as nib
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    in_paths = [Path(p).resolve() for p in inputs]
    for p in in_paths:
        if out_dir.resolve() == p.parent:
            raise ValueError(f"output folder {out_dir} is the input folder; choose another")
    stage1, stage2, targs = load_models(run_dir, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, t0 = [], time.time()
    for i, path in enumerate(in_paths, 1):
        name = data.case_name(path)
        name = name[:-5] if name.endswith("_0000") else name
        target = output_path(out_dir, name)
        if target.resolve() in in_paths:
            raise ValueError(f"{target} is an input file; refusing to overwrite it")
        case = data.Case(name, path, None, int(channel) if str(channel).isdigit() else 0, "auto")
        if not str(channel).isdigit():
            case.channel = data.find_cases(path.parent.parent, channel, require_labels=False)[0].channel
        prep = data.preprocess(case, need_label=False, log=log)
        prob, centre = segment(prep, stage1, stage2, device, log, largest_component)
        ref = nib.load(str(path))
        mask = data.to_original_grid(prob, prep.meta)
        save_like(mask, ref, target, np.uint8)
        if save_prob:
            save_like(data.to_original_grid(prob, prep.meta, threshold=None), ref,
                      output_path(out_dir, name, "_prob"), np.float32)
        written.append(target)
        log(f"[{i}/{len(in_paths)}] {name}: centre {np.round(centre).astype(int).tolist()} (1-mm crop voxels), "
            f"{int(mask.sum())} prostate voxels -> {target} ({time.time() - t0:.0f} s)")
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("input", help="NIfTI file or folder")
    p.add_argument("output_dir")
    p.add_argument("--channel", default="0", help="channel of 4-D inputs, by index or name")
    p.add_argument("--save-prob", action="store_true", help="also write the probability heatmap")
    p.add_argument("--largest-component", action="store_true", help="keep only the largest connected component")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    try:
        run(args.run_dir, list_inputs(Path(args.input)), args.output_dir, args.channel,
            torch.device(args.device) if args.device else None, args.save_prob, args.largest_component)
    except (ValueError, FileNotFoundError) as e:      # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
