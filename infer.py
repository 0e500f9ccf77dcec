"""Segment the prostate in new images with a trained two-stage MetricUNet (Sections III-A, IV-B).

    python infer.py RUN_DIR INPUT OUTPUT_DIR [--save-prob] [--channel T2]
    [--one-piece | --no-one-piece] [--png DIR [--gt GT]]

INPUT is a NIfTI file or a folder of them (a Decathlon/nnU-Net root's imagesTr/ is used). For each
image:
  body crop + 1 mm + [0, 255] (Section IV-B, data.preprocess) -> 1/4 size -> Stage 1 on whole slices
  (Section III-A) -> prostate centre = mean of the femoral-head reference centre and the Stage-1
  centre (Section III-A) -> 128^3 crop at 1 mm -> Stage 2 on whole slices, no patch voting (Section
  IV-B) -> the run's post-processing, if it decided on one (RUN_DIR/postprocessing.json: keep the
  piece at the prostate centre) -> probability mapped back onto the input's own grid ->
  OUTPUT_DIR/CASE.nii.gz (uint8 mask, the input's affine and shape); with --save-prob also
  CASE_prob.nii.gz (float32 heatmap, Fig. 1).
With --png DIR, a picture per case: axial slices through the prostate with the prediction's contour
(red), the ground truth's when --gt is given (green, as in Fig. 8), and the heatmap (Fig. 1). It
never writes inside an input data folder and never replaces an existing file unless --overwrite is
given. """
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import data
import figures
import metricunet as M


def load_models(run_dir, device):
    """The best Stage-1 and Stage-2 checkpoints of a run (weights_only: no pickle code is executed),
    and the Stage-2 run's arguments with Stage 1's own stage1_antialias. Each network is rebuilt
    from the sizes its checkpoint records (filters, config, width), so any run folder of any preset
    loads without flags."""
    run = Path(run_dir)
    models = []
    for stage in (1, 2):
        path = run / f"stage{stage}_best.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run} a finished train.py run folder?")
        try:                   # weights_only: a checkpoint that holds code is refused, never run
            ck = M.load_checkpoint(path, device)
            a = ck["args"]
            model = (M.LightUNet(in_channels=5, filters=a["stage1_filters"]) if stage == 1
                     else M.build_model(a["config"], in_channels=3, width=a["width"]))
            model.load_state_dict(ck["model"])
        except Exception as e:  # truncated, garbage, foreign or code-carrying files all end here
            raise ValueError(f"{path}: not a valid or trusted train.py checkpoint "
                             f"({type(e).__name__}); it was not "
                             f"loaded. Use the run folder train.py wrote, or retrain") from None
        # channels-last memory layout: the same weights, stored pixel by pixel; oneDNN's
        # convolutions run faster on it (bench.py infer: Stage 2 at Table I width ~19 % faster on 2
        # CPU cores, outputs equal to 1e-7). Inference only: training measured 9 % slower with it,
        # so train.py leaves it alone.
        models.append(model.to(device).eval().to(memory_format=torch.channels_last))
        # how Stage 1 saw its input (it may come from another run)
        if stage == 1:
            stage1_antialias = bool(a.get("stage1_antialias", False))
    return models[0], models[1], dict(ck["args"], stage1_antialias=stage1_antialias)


@torch.inference_mode()
def predict_volume(model, volume_u8, n_slices, device, chunk=8, amp=False, step=1):
    """Whole-slice inference without patch voting (Section IV-B): prostate probability, same shape.
    Under inference_mode (no autograd bookkeeping at all, a little faster than no_grad). A model
    stored channels-last (load_models) gets its input in the same layout, so no convolution converts
    it."""
    x = data.slices_25d(volume_u8, n_slices, step=step)
    out = np.empty((x.shape[0],) + x.shape[2:], np.float32)
    first = next(p for p in model.parameters() if p.dim() == 4)
    stored_last = first.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if stored_last else torch.contiguous_format
    for i in range(0, len(x), chunk):
        xb = torch.from_numpy(x[i:i + chunk]).to(device).contiguous(memory_format=layout)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits, _ = model(xb)
        out[i:i + chunk] = torch.softmax(logits.float(), 1)[:, 1].cpu().numpy()
    X, Y, _ = volume_u8.shape
    return out[:, :X, :Y].transpose(1, 2, 0)


def stage1_centre(prob_quarter: np.ndarray):
    """Section III-A: "the rough predicted prostate center is determined by the coarse prostate
    segmentation". Paper is silent on stray voxels: we take the centroid of the largest connected
    component, in 1-mm voxels."""
    mask = prob_quarter > 0.5
    if not mask.any():
        return None
    return np.argwhere(data.largest_component(mask)).mean(0) * data.STAGE1_FACTOR


def prostate_centre(reference, predicted, shape, log=print, name=""):
    """Section III-A: "The prostate centroid is calculated by an average of the reference prostate
    center and rough predicted prostate center." Either one alone if the other is missing; the
    volume centre if neither."""
    if reference is not None and predicted is not None:
        return (np.asarray(reference) + np.asarray(predicted)) / 2
    if predicted is not None:
        return np.asarray(predicted)
    if reference is not None:
        log(f"  {name}: Stage 1 found no prostate; using the femoral-head reference centre alone")
        return np.asarray(reference)
    log(f"  {name}: no Stage-1 prostate and no reference centre; using the centre of the body crop")
    return (np.asarray(shape) - 1) / 2


def segment(prep: data.Prepared, stage1, stage2, device, log=print, one_piece=False,
            stage1_antialias=False, native_slices=False):
    """One preprocessed case -> (prostate probability on the 1-mm body crop, centre used).
    stage1_antialias and native_slices: the run's inputs as it was trained (train.py
    --stage1-antialias, --native-slices). one_piece: post-processing (keep_one_piece)."""
    # Section III-A: Stage 1 sees the whole body at 1/4 size, 5 slices at a time, and only has to
    # say where the prostate is; its centre is averaged with the femoral-head reference centre (CT).
    img1, _ = data.stage1_pair(prep, antialias=stage1_antialias)
    p1 = predict_volume(stage1, img1, 5, device)
    centre = prostate_centre(prep.meta["reference_centre"], stage1_centre(p1), prep.image.shape,
                             log, prep.name)
    # Section III-B: Stage 2 segments the 128^3 crop at 1 mm around that centre, 3 slices at a time.
    # The crop is padded past the body's edge, so a centre near the border still gives a full-size
    # input.
    crop, start = data.crop_around(prep.image, centre, data.CROP_SIZE)
    p2 = predict_volume(stage2, crop, 3, device, step=data.native_slice_step(prep, native_slices))
    if one_piece:                              # the paper uses no post-processing
        p2 = keep_one_piece(p2, centre - start, log, prep.name)
    # the crop's probabilities pasted back into the body crop (zero outside), clipped where the crop
    # overhangs
    prob = np.zeros(prep.image.shape, np.float32)
    src = tuple(slice(max(s, 0),
                      min(s + data.CROP_SIZE, n)) for s, n in zip(start, prep.image.shape))
    dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start))
    prob[src] = p2[dst]
    return prob, centre


def keep_one_piece(prob: np.ndarray, centre, log=print, name: str = "") -> np.ndarray:
    """Post-processing (paper is silent): the mask (prob > 0.5) keeps one piece, the one at the
    prostate centre that Section III-A's crop is centred on (data.central_piece); the probability of
    every other piece is set to 0, so no resampling brings it back. Says what it removed.

    nnU-Net keeps the largest piece instead; on the MRI folds the largest piece once lay off the
    gland (DSC 0 against 0.65 for the central one, results/README.md), while the prostate is where
    Stage 1 put the crop's centre."""
    mask = prob > 0.5
    n = data.pieces(mask)
    if n < 2:
        return prob
    keep = data.central_piece(mask, centre)
    log(f"  {name}: kept the piece at the prostate centre, 1 of {n} pieces: "
        f"{100 * keep.sum() / mask.sum():.0f} % of the mask")
    return np.where(keep | ~mask, prob, 0.0).astype(np.float32)


# The run's post-processing decision (train.py --postprocess decide: train.decide_postprocessing)
POSTPROCESSING = "postprocessing.json"


def run_postprocessing(run_dir) -> bool:
    """Whether a run keeps one piece of each mask: its postprocessing.json says, on the
    evidence of its held-out masks; a run without one (the paper preset, --paper-strict,
    --postprocess off) gives the raw masks."""
    import json
    path = Path(run_dir) / POSTPROCESSING
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text())["one_piece"] is True
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a train.py post-processing decision; delete it (the masks "
                         f"are then raw) or retrain") from None


def output_path(out_dir: Path, case: str, suffix: str = "") -> Path:
    """OUT/CASE.nii.gz (the mask, named like the input case so metrics.py pairs it with its
    label)."""
    return out_dir / f"{case}{suffix}.nii.gz"


def save_like(array, reference_img, path: Path, dtype):
    """NIfTI with the input's affine and its sform/qform codes; written to a temporary name, then
    renamed. The input's header is copied so that a viewer overlays the mask on the scan exactly
    (same grid, same orientation, same codes); scaling is reset to 1/0 because a mask's values are
    labels, not intensities."""
    import nibabel as nib
    hdr = reference_img.header.copy()
    img = nib.Nifti1Image(array.astype(dtype), reference_img.affine, hdr)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1, 0)
    data.atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


IMAGE_FOLDERS = ("imagesTr", "imagesTs", "images")
LABEL_FOLDERS = ("labelsTr", "labelsTs", "labels")


def list_inputs(inp: Path, channel="0", log=print) -> list:
    """The images to segment, as [(case, file, channel within the file)]: a file, or every image of
    a folder (a data set root's imagesTr/), channels found by data.image_cases, the rule training
    uses (nnU-Net's CASE_XXXX files: the one of --channel). PROMISE12's CASE_segmentation labels
    beside the images are not images and are skipped."""
    if inp.is_dir():
        folder = inp / "imagesTr" if (inp / "imagesTr").is_dir() else inp
        root = folder.parent if folder.name in IMAGE_FOLDERS else folder
        meta = data.read_dataset_json(root)
        index = data.channel_index(channel, meta.get("modality") or meta.get("channel_names") or {},
                                   root)
        items = data.image_cases(folder, 0 if index is None else index)
        if not items:
            other = sorted({p.suffix for p in folder.iterdir()
                            if p.suffix in (".mhd", ".mha", ".nrrd", ".dcm")})
            hint = (f" (found {', '.join(other)}: NIfTI only, convert them first, e.g. with "
                    f"SimpleITK)" if other else "")
            raise FileNotFoundError(f"no NIfTI images (.nii, .nii.gz) in {folder}{hint}")
        if index is None:                 # a channel name and no dataset.json: each file decides
            items = [(n, p, resolve_channel(p, channel, log)) for n, p, _ in items]
        return items
    if not inp.is_file():
        raise FileNotFoundError(f"{inp}: no such file or folder")
    if not inp.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{inp}: not a NIfTI file (.nii, .nii.gz); convert it first, e.g. with "
                         f"SimpleITK")
    return [(data.image_case_name(inp), inp, resolve_channel(inp, channel, log))]


def protected_folders(in_paths, input_arg=None, gt=None) -> tuple:
    """(trees, folders): nothing may be written inside a tree or into a folder. Trees: the folder
    given as input, the --gt folder, and the data set an image or label belongs to (the parent of
    imagesTr/, labelsTr/, images/ ..., or any folder with a dataset.json above it), so neither the
    images nor the labels can be replaced, with --overwrite or without. Folders: each input file's
    own folder (a subfolder of it, e.g. ./out next to ./scan.nii.gz, is fine)."""
    trees = {Path(d).resolve() for d in (input_arg, gt) if d is not None and Path(d).is_dir()}
    files = list(in_paths) + ([Path(gt)] if gt is not None and Path(gt).is_file() else [])
    folders = {Path(p).resolve().parent for p in files}
    for folder in folders | set(trees):
        if folder.name in IMAGE_FOLDERS + LABEL_FOLDERS:
            trees.update({folder, folder.parent})
        trees.update(f for f in (folder, *folder.parents) if (f / "dataset.json").is_file())
    return trees, folders


def check_output_folder(out_dir: Path, protected: tuple, what: str = "output folder") -> None:
    """Refuse an output folder inside a protected tree, or equal to a protected folder (NOTES.md,
    "Safety"): masks named like the inputs must never land beside, or replace, the scans or labels
    they came from."""
    trees, folders = protected
    o = Path(out_dir).resolve()
    for f in sorted(trees | folders):
        if o == f or (f in trees and f in o.parents):
            raise ValueError(f"{what} {out_dir} lies inside an input folder ({f}), where nothing "
                             f"is written; choose a folder outside it")


def resolve_channel(path: Path, channel, log=print) -> int:
    """--channel of one file: an index, or a name through the dataset.json of the data set it
    belongs to (data.channel_index). A 3-D image has one channel, so a name (e.g. T2) is accepted
    for it with a note."""
    if str(channel).isdigit():
        return int(channel)
    import nibabel as nib
    try:
        shape = nib.load(str(path)).shape
    except Exception as e:
        raise data.DataError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from None
    if len(shape) == 3:
        log(f"  {path.name}: a 3-D image has a single channel; using it for --channel {channel}")
        return 0
    meta = data.read_dataset_json(path.parent.parent)
    names = meta.get("modality") or meta.get("channel_names") or {}
    index = data.channel_index(channel, names, path)
    if index is None:
        raise data.DataError(f"{path}: no dataset.json above it names channel {channel!r}; give "
                             f"--channel as an index, 0 to {shape[3] - 1}")
    return index


def ground_truth_for(gt, name: str):
    """--gt: a label file (one input), or a folder / data set root in which the case's label is
    found. Used only for the pictures (green contour); a case without a label is drawn without
    one."""
    if gt is None:
        return None
    import metrics
    gt = Path(gt)
    if gt.is_file():
        return gt
    return metrics.nifti_files(gt, "gt").get(name)


def run(run_dir, items, out_dir, device=None, save_prob=False, one_piece=None, log=print,
        overwrite=False, png_dir=None, gt=None, input_arg=None):
    """Segment every input into out_dir; items: [(case, image file, channel)] as list_inputs gives.
    Returns the written mask paths. Everything is checked before any work: no output inside an input
    data folder or the ground truth, no two inputs written to one name, no existing file replaced
    unless overwrite (and never an input). one_piece: None follows the run's own decision
    (run_postprocessing); True or False overrides it."""
    import nibabel as nib
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    names = [name for name, _, _ in items]
    in_paths = [Path(p).resolve() for _, p, _ in items]
    protected = protected_folders(in_paths, input_arg, gt)
    check_output_folder(out_dir, protected)
    if png_dir is not None:
        check_output_folder(Path(png_dir), protected, "--png folder")
    # Output names follow the input cases (nnU-Net's CASE_0000 channel suffix dropped), so that
    # metrics.py finds each mask's label by name. Every file this run would write is listed first:
    # if any exists and --overwrite was not given, the run stops before doing any work, rather than
    # after the first hour.
    for i, name in enumerate(names):                      # two inputs, one output name
        if name in names[:i]:
            j = names.index(name)
            raise ValueError(f"{in_paths[j]} and {in_paths[i]} would both be written to "
                             f"{output_path(out_dir, name)}; segment them into separate folders")
    targets = [output_path(out_dir, n) for n in names]
    targets += [output_path(out_dir, n, "_prob") for n in names] if save_prob else []
    targets += [Path(png_dir) / f"{n}.png" for n in names] if png_dir is not None else []
    if not overwrite:
        existing = [t for t in targets if t.exists()]
        if existing:
            raise ValueError(f"{existing[0]} exists ({len(existing)} output file(s) would be "
                             f"replaced); pass --overwrite to replace them, or choose another "
                             f"output folder")
    stage1, stage2, targs = load_models(run_dir, device)
    if one_piece is None:
        one_piece = run_postprocessing(run_dir)
        if one_piece:
            log(f"post-processing: {Path(run_dir) / POSTPROCESSING} keeps the piece at the "
                f"prostate centre of each mask (--no-one-piece for the raw masks)")
    for folder in (out_dir, png_dir):
        if folder is not None:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"cannot create {folder}: {e.strerror}") from None
    # One case at a time: preprocess (Section IV-B), both stages (segment), back onto the input's
    # own grid (the inverse of the body crop and the 1-mm resampling), then write with the input's
    # affine and header.
    written, t0 = [], time.time()
    for i, ((name, _, channel), path) in enumerate(zip(items, in_paths), 1):
        target = output_path(out_dir, name)
        label = ground_truth_for(gt, name)
        case = data.Case(name, path, label, channel, "auto")
        prep = data.preprocess(case, need_label=label is not None, log=log)
        prob, centre = segment(prep, stage1, stage2, device, log, one_piece,
                               stage1_antialias=bool(targs.get("stage1_antialias", False)),
                               native_slices=bool(targs.get("native_slices", False)))
        ref = nib.load(str(path))
        mask = data.to_original_grid(prob, prep.meta)
        if one_piece:            # resampling can cut the kept piece's thin necks: its crumbs go too
            mask = data.largest_piece(mask).astype(np.uint8)
        try:
            save_like(mask, ref, target, np.uint8)
            if save_prob:
                save_like(data.to_original_grid(prob, prep.meta, threshold=None), ref,
                          output_path(out_dir, name, "_prob"), np.float32)
            # Fig. 1 heatmap + Fig. 8 contours
            if png_dir is not None:
                figures.write_png(Path(png_dir) / f"{name}.png",
                                  figures.overlay_figure(prep.image, prob, prep.label))
        except OSError as e:
            raise ValueError(f"cannot write into {out_dir}: {e.strerror}") from None
        written.append(target)
        log(f"[{i}/{len(in_paths)}] {name}: centre {np.round(centre).astype(int).tolist()} (1-mm "
            f"crop voxels), {int(mask.sum())} prostate voxels -> {target} ({time.time() - t0:.0f} "
            f"s)")
    return written


def main(argv=None):
    """The command line. User errors (missing files, bad channels, protected or occupied outputs, a
    bad checkpoint) are one line on stderr and exit code 2. Output folders and existing files are
    checked before the first case is read; a case that fails to load later stops the run with the
    earlier masks complete."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("input", help="NIfTI file or folder")
    p.add_argument("output_dir")
    p.add_argument("--channel", default="0", help="channel of 4-D inputs, by index or name")
    p.add_argument("--save-prob", action="store_true", help="also write the probability heatmap")
    p.add_argument("--one-piece", action=argparse.BooleanOptionalAction,
                   help="keep one piece of each mask, at the prostate centre (default: as the run "
                   "decided, see its postprocessing.json; raw masks if it has none)")
    p.add_argument("--png", metavar="DIR",
                   help="per case, a PNG of axial slices: contours (Fig. 8) and heatmap (Fig. 1)")
    p.add_argument("--gt", metavar="FILE_OR_DIR",
                   help="ground truth to draw in the --png pictures (green)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError as e:
        p.error(f"--device {args.device}: {e}")
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is available here; leave --device out to use "
                f"the CPU")
    try:
        items = list_inputs(Path(args.input), args.channel)
        run(args.run_dir, items, args.output_dir, device, args.save_prob, args.one_piece,
            overwrite=args.overwrite, png_dir=args.png, gt=args.gt, input_arg=args.input)
    except (ValueError, FileNotFoundError) as e:      # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    data.run_command(main, "the masks written so far are complete; rerun with --overwrite or "
                           "another folder for the rest")
