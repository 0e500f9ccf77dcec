"""Speed measurements, nanoGPT-style: each entry runs the things it compares side by side in one
process, repeated and interleaved, and prints medians and their ratio. Not a test; nothing here
asserts.

    python bench.py model     # SGD step of UNet vs MetricUNet-HCP, Table I width, batch 30x3x64x64
    python bench.py metrics   # metrics.evaluate (union-box crop) vs the same on the whole volume
    python bench.py loader    # Stage-2 patches/s the loader delivers vs what a training step uses
    python bench.py step      # cpu-preset Stage-2 step with its loader: paper vs small-data patches
    python bench.py infer     # one phantom case through Stage 1 + Stage 2 (paper and cpu width)
    python bench.py gpu --device cuda   # bf16 vs fp32 gradients, step time, memory, torchrun
    python bench.py all       # all of the above but gpu
Add --device cuda on a GPU machine.

How to read the numbers. A 2-core CPU is a noisy instrument: the same step can take 3-6 % longer
from one round to the next (other processes, frequency scaling, the allocator). So nothing is timed
once: each entry warms up first (lazy initialisation, oneDNN kernel selection, DataLoader worker
start-up), then times the variants it compares in alternation, round after round, and reports
medians. A drift of the machine then slows both variants alike and cancels in their ratio. Where it
matters, an A/A pair (the same thing timed twice under two names) shows the noise floor: a
difference smaller than that is not a measurement. Each entry also prints what it checks besides
time (identical metric values, equal probabilities), because a faster result that differs is not an
optimisation. """
import argparse
import statistics
import time

import torch


def timed(fn, device):
    """Wall time of one call. On CUDA, kernels run asynchronously, so the device is synchronised
    before the clock starts and before it stops; otherwise the time would be that of queueing the
    work, not doing it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_model(args, device):
    """Section IV-D: "MetricUNet-HP only takes less than 10% additional training time compared with
    U-Net".

    A whole SGD step (forward, Eq. 4, backward, update) of UNet and of the chosen row on the same
    batch, interleaved, plus an identical second UNet for the noise floor. The metric branch adds no
    weights, so the difference is the samplers, Eq. 2 and the extra backward through conv6d; the
    second measurement times just those on fixed network outputs, which is the overhead without the
    network's own noise."""
    import metricunet as M
    torch.manual_seed(0)
    N, H = args.batch, 64
    x = torch.randn(N, 3, H, H, device=device)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij")
    disc = ((yy - 32) ** 2 + (xx - 28) ** 2 <= 15 ** 2).long().to(device)
    labels = disc.expand(N, H, H).clone()
    # a third of the patches hold no prostate, as in training
    labels[::3] = 0
    runs = {}
    # "UNet (A/A)" is a second, identical UNet: the spread between the two UNets is the noise floor
    for key, name in (("UNet", "UNet"), (args.config, args.config), ("UNet (A/A)", "UNet")):
        cfg = M.get_config(name)
        torch.manual_seed(0)
        model = M.build_model(cfg, width=args.width).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator(device=device).manual_seed(0)

        def step(model=model, opt=opt, cfg=cfg, gen=gen):
            logits, feats = model(x, detach_head_input=cfg.separate)
            loss, _ = M.total_loss(logits, feats, labels, cfg, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        runs[key] = step
    for fn in runs.values():                              # warm-up
        timed(fn, device)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):                         # interleaved so drift hits both alike
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:>10}: median {med[name]*1000:9.1f} ms/step over {len(t)} steps (min "
              f"{min(t)*1000:.1f}, max {max(t)*1000:.1f})")
    unet = (med["UNet"] + med["UNet (A/A)"]) / 2
    print(f"  overhead of MetricUNet-{args.config} over UNet: "
          f"{100 * (med[args.config] / unet - 1):+.2f} %  (paper: < 10 %); noise floor, UNet vs "
          f"identical UNet: {100 * abs(med['UNet (A/A)'] / med['UNet'] - 1):.2f} %")
    # The metric module alone: Eq. 4's extra terms (samplers, Eq. 2, their backward into conv6d) on
    # fixed network outputs, minus the cross-entropy alone, timed side by side.
    with torch.no_grad():
        logits, feats = M.build_model("UNet", width=args.width).to(device)(x)
    logits.requires_grad_(True)
    feats.requires_grad_(True)
    gen = torch.Generator(device=device).manual_seed(0)
    extra = {}
    for name in ("UNet", args.config):
        cfg = M.get_config(name)
        fn = lambda cfg=cfg: M.total_loss(logits, feats, labels, cfg, generator=gen)[0].backward()
        timed(fn, device)
        extra[name] = statistics.median(timed(fn, device) for _ in range(max(5, args.repeats)))
    cost = extra[args.config] - extra["UNet"]
    print(f"  metric module alone: {cost * 1000:.1f} ms per step = {100 * cost / unet:.2f} % of a "
          f"UNet step")


def bench_metrics(args, device):
    """metrics.evaluate (every metric, counts and transforms inside the masks' union box) against
    the same metrics over the whole volume, on a CT-sized pair: 512x512x160 at 0.93x0.93x2.5 mm,
    prostate-sized object. The prostate fills about 0.05 % of such a volume, so the Euclidean
    distance transforms behind ASD and HD95 (Eq. 6, 8) spend almost all their time far from any
    surface; cropping to the masks' union box (plus a margin) gives the same distances. The values
    of both are printed, and must be identical."""
    import numpy as np
    import metrics
    sp = np.array([0.93, 0.93, 2.5])
    shape = (512, 512, 160)
    x, y, z = (np.arange(n)[tuple(slice(None) if a == i else None for a in range(3))] * s
               for i, (n, s) in enumerate(zip(shape, sp)))
    # 40 x 30 x 35 mm
    gt = ((x - 230) / 20) ** 2 + ((y - 250) / 15) ** 2 + ((z - 200) / 17.5) ** 2 <= 1
    pred = ((x - 232.5) / 21) ** 2 + ((y - 248) / 14) ** 2 + ((z - 203) / 17) ** 2 <= 1
    res = {}
    for name, crop in (("this project", True), ("whole volume", False)):
        t = []
        for _ in range(args.repeats if crop else max(1, args.repeats // 3)):
            t0 = time.perf_counter()
            res[name] = metrics.evaluate(pred, gt, sp, crop=crop)
            t.append(time.perf_counter() - t0)
        res[name + " s"] = statistics.median(t)
        print(f"  {name:>12}: median {res[name + ' s'] * 1000:9.1f} ms (first call "
              f"{t[0] * 1000:.1f} ms)   DSC {res[name]['DSC']:.4f}, HD95 {res[name]['HD95']:.4f} "
              f"mm, ASD {res[name]['ASD']:.4f} mm")
    same = all(res["this project"][k] == res["whole volume"][k] for k in res["this project"])
    print(f"  speed-up {res['whole volume s'] / res['this project s']:.0f}x, identical values: "
          f"{same}")


def bench_loader(args, device):
    """The Stage-2 loader (128^3 crops, 64x64x3 patches) vs what a training step consumes at batch
    30. The loader must never starve the model: patches per second delivered (with 0 and 2 workers,
    with and without augmentation) against patches per second a training step uses at Table I width
    and at the CPU preset's. As long as the first number is well above the second, data loading is
    not the bottleneck."""
    import numpy as np
    from torch.utils.data import DataLoader
    import data
    import metricunet as M
    # Eight random 128^3 crops with a box-shaped "prostate": the loader's work depends on shapes and
    # the patch recipe, not on image content, so synthetic volumes measure it fairly and need no
    # data on disk.
    rng = np.random.default_rng(0)
    vols = [rng.integers(0, 255, (128, 128, 128), dtype=np.uint8) for _ in range(8)]
    labs = [np.zeros((128, 128, 128), np.uint8) for _ in range(8)]
    for lab in labs:
        lab[44:84, 50:80, 46:81] = 1
    # --augment (small-data presets) vs the paper's patches
    for augment in (False, True):
        ds = data.PatchDataset(vols, labs, patch=64, n_slices=3, patches_per_image=500,
                               augment=augment)
        for workers in (0, 2):
            loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=workers,
                                drop_last=True)
            t0, n = time.perf_counter(), 0
            for x, _ in loader:
                n += len(x)
                if n >= 3000:
                    break
            print(f"  loader, {workers} workers, augment {'on ' if augment else 'off'}: "
                  f"{n / (time.perf_counter() - t0):9.0f} patches/s")
    # What a training step consumes: batch / (time of one HCP step), at --width and at the CPU
    # preset's 0.25.
    for width in (args.width, 0.25):
        model = M.build_model("HCP", width=width).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.rand(args.batch, 3, 64, 64, device=device)
        y = torch.zeros(args.batch, 64, 64, dtype=torch.long, device=device)
        y[:, 20:40, 20:40] = 1

        def step():
            logits, feats = model(x)
            loss, _ = M.total_loss(logits, feats, y, M.get_config("HCP"))
            opt.zero_grad()
            loss.backward()
            opt.step()
        timed(step, device)
        t = statistics.median(timed(step, device) for _ in range(3))
        print(f"  training step, width {width}: {args.batch / t:9.0f} patches/s consumed")


def bench_step(args, device):
    """A Stage-2 training step at the cpu preset (width 0.25, batch 16, MetricUNet-HCP), data loader
    included (2 workers, as train.py): the paper's patches against the cpu preset's Stage-2 addition
    (--augment spatial), interleaved in rounds so that drift hits both alike. On 2 CPU cores the
    loader's workers share the cores with the step, so this is what a user's epoch costs."""
    import numpy as np
    from torch.utils.data import DataLoader
    import data
    import metricunet as M
    rng = np.random.default_rng(0)
    vols = [rng.integers(0, 255, (128, 128, 128), dtype=np.uint8) for _ in range(4)]
    labs = [np.zeros((128, 128, 128), np.uint8) for _ in range(4)]
    for lab in labs:
        lab[44:84, 50:80, 46:81] = 1
    import train
    cfg = M.get_config("HCP")
    # Both variants read the presets' own settings, so this bench follows the presets if they
    # change. Each variant has its own loader with persistent workers: the 2 workers of both share
    # the 2 cores with the step, as in a real run, and a step includes waiting for its batch.
    cpu = {**train.PAPER_STRICT, **train.PRESETS["cpu"]}
    variants = {"paper (no additions)": (train.PAPER_STRICT["augment"],
                                         train.PAPER_STRICT["hard_negatives"]),
                "small-data additions": (cpu["augment"], cpu["hard_negatives"])}
    runs = {}
    for name, (augment, hard_neg) in variants.items():
        ds = data.PatchDataset(vols, labs, patch=64, n_slices=3, patches_per_image=2000,
                               augment=augment)
        loader = iter(DataLoader(ds, batch_size=16, shuffle=True, num_workers=2,
                                 persistent_workers=True))
        torch.manual_seed(0)
        model = M.build_model(cfg, width=0.25).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator(device=device).manual_seed(0)

        def step(loader=loader, model=model, opt=opt, gen=gen, hard_neg=hard_neg):
            x, y = next(loader)
            logits, feats = model(x.to(device))
            hp = M.Settings(hard_negatives=hard_neg)
            loss, _ = M.total_loss(logits, feats, y.to(device), cfg, hp, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        runs[name] = step
    # Rounds of 5 steps per variant, alternating: a single step is too short to time against the
    # loader's bursts (a worker finishes a batch every few steps), 5 steps average over one such
    # cycle.
    times = {name: [] for name in runs}
    # warm-up: workers started, first batches made
    for name, fn in runs.items():
        for _ in range(3):
            timed(fn, device)
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(sum(timed(fn, device) for _ in range(5)) / 5)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in runs:
        print(f"  {name:>22}: median {med[name] * 1000:8.1f} ms/step over {len(times[name])} "
              f"rounds of 5 steps")
    a, b = med["paper (no additions)"], med["small-data additions"]
    print(f"  additions cost {100 * (b / a - 1):+.1f} % per step (target: at most +5 %)")


def bench_infer(args, device):
    """One phantom case through infer.segment, per stage (untrained weights: timing only), then the
    memory layout: the same Stage-2 weights stored channels-last (pixel by pixel) against the
    default layout. oneDNN's CPU convolutions prefer channels-last; the check is whether the outputs
    agree."""
    import tempfile
    import numpy as np
    import data
    import infer
    import metricunet as M
    import phantom
    with tempfile.TemporaryDirectory() as tmp:
        root = phantom.make_phantom(f"{tmp}/ph", cases=1, seed=5, log=None)
        case = data.find_cases(root)[0]
        t0 = time.perf_counter()
        prep = data.preprocess(case)
        print(f"  preprocessing {prep.image.shape} at 1 mm: {time.perf_counter() - t0:.2f} s")
        # Stage 1 reads the small 1/4-size body image; Stage 2 reads 128 whole 128x128 slices of the
        # crop, which is where inference time goes. Both at the paper's width (Table I; 32 Stage-1
        # filters) and at the CPU preset's (0.25; 16 filters).
        for width, filters in ((1.0, 32), (0.25, 16)):
            s1 = M.LightUNet(5, filters=filters).to(device).eval()
            s2 = M.build_model("HCP", width=width).to(device).eval()
            img1, _ = data.stage1_pair(prep)
            t1 = timed(lambda: infer.predict_volume(s1, img1, 5, device), device)
            crop, _ = data.crop_around(prep.image, data.label_centre(prep.label))
            t2 = timed(lambda: infer.predict_volume(s2, crop, 3, device), device)
            print(f"  width {width}: stage 1 {t1:.2f} s, "
                  f"stage 2 (128 slices of 128x128) {t2:.2f} s")
        # Channels-last (what infer.load_models uses) against the default layout: Stage 2 at Table I
        # width on the first 32 slices of the crop, the same weights, interleaved rounds so that
        # drift hits both alike.
        torch.manual_seed(0)
        plain = M.build_model("HCP", width=1.0).to(device).eval()
        last = M.build_model("HCP", width=1.0).to(device).eval()
        last.load_state_dict(plain.state_dict())
        last = last.to(memory_format=torch.channels_last)
        part = crop[:, :, :32]
        times = {"default layout": [], "channels-last": []}
        for _ in range(max(3, args.repeats // 2)):
            for name, model in (("default layout", plain), ("channels-last", last)):
                times[name].append(timed(lambda: infer.predict_volume(model, part, 3, device),
                                         device))
        same = np.abs(infer.predict_volume(plain, part, 3, device)
                      - infer.predict_volume(last, part, 3, device)).max()
        med = {k: statistics.median(v) for k, v in times.items()}
        for name, t in med.items():
            print(f"  stage 2, width 1.0, 32 slices, {name:>14}: median {t:.2f} s over "
                  f"{len(times[name])} rounds")
        print(f"  channels-last: {100 * (med['channels-last'] / med['default layout'] - 1):+.1f} % "
              f"time; largest probability difference {same:.1e}")


def gradient_agreement(model, x, labels, cfg, part: str, dtype) -> float:
    """||g_dtype - g_fp32|| / ||g_fp32|| of the parameter gradient of one part of Eq. 4 ('ce', or a
    sampler's lambda * L_metric), the forward pass under autocast to `dtype` (float32: 0 exactly).
    The samplers draw from the same seed in both passes, so both differentiate the same tuples."""
    import metricunet as M

    def grads(autocast_dtype):
        model.zero_grad(set_to_none=True)
        gen = torch.Generator(device=x.device).manual_seed(0)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits, feats = model(x)
        loss, parts = _eq4(logits.float(), feats, labels, cfg, gen)
        (parts[part] if part == "ce" else M.PAPER_DEFAULTS.lam * parts[part]).backward()
        return torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])
    ref = grads(None)
    other = grads(None if dtype == torch.float32 else dtype)
    return float((other - ref).norm() / ref.norm().clamp_min(1e-30))


def _eq4(logits, feats, labels, cfg, gen):
    """Eq. 4 at the paper's settings (metricunet.total_loss)."""
    import metricunet as M
    return M.total_loss(logits, feats, labels, cfg, M.PAPER_DEFAULTS, gen)


def bench_gpu(args, device):
    """The checks a GPU machine runs first (under 8 minutes on one GPU; smaller on a CPU, which the
    tests run): (1) bf16 against fp32 gradients, for cross-entropy and for the metric term apart:
    Eq. 2's squared distances of unit vectors differ by a few per cent of 2, which bf16's 8-bit
    mantissa resolves coarsely, so the metric term may need fp32 under --amp; (2) step time and peak
    memory at --width and --batch (Table I and 30 by default), fp32 against bf16 against
    channels-last; (3) one Stage-2 epoch under torchrun on every GPU, unless --no-torchrun."""
    import metricunet as M
    torch.manual_seed(0)
    cfg = M.get_config(args.config)
    model = M.build_model(cfg, width=args.width).to(device)
    x = torch.randn(args.batch, 3, 64, 64, device=device)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = ((yy - 32) ** 2 + (xx - 28) ** 2) <= 15 ** 2
    labels = disc.long().to(device).expand(args.batch, 64, 64)
    for part in ("ce",) + cfg.samplers:
        err = gradient_agreement(model, x, labels, cfg, part, torch.bfloat16)
        print(f"  gradient of {part:>7}: bf16 vs fp32 relative error {err:.3f}")
    for name, dtype, last in (("fp32", None, False), ("bf16", torch.bfloat16, False),
                              ("bf16 channels-last", torch.bfloat16, True)):
        net = model.to(memory_format=torch.channels_last if last else torch.contiguous_format)
        xb = x.contiguous(memory_format=torch.channels_last if last else torch.contiguous_format)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step():
            on = dtype is not None
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=on):
                logits, feats = net(xb)
            loss, _ = _eq4(logits.float(), feats, labels, cfg, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        timed(step, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = statistics.median(timed(step, device) for _ in range(args.repeats))
        gib = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
        mem = f", peak {gib:.2f} GiB" if gib is not None else ""
        print(f"  step {name:>18}: {t * 1000:8.1f} ms "
              f"(width {args.width}, batch {args.batch}){mem}")
    if not args.no_torchrun:
        import subprocess
        import sys
        n = max(1, torch.cuda.device_count()) if device.type == "cuda" else 2
        import tempfile
        out = tempfile.mkdtemp(prefix="bench-gpu-")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "train.py",
               "--preset", "cpu", "--stage", "2", "--epochs2", "1", "--no-test", "--out", out]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        tail = "" if r.returncode == 0 else "\n" + r.stderr[-2000:]
        print(f"  one Stage-2 epoch under torchrun, {n} process(es): rc {r.returncode}, "
              f"{time.perf_counter() - t0:.0f} s{tail}")


def main(argv=None):
    """Run the chosen entries. Arguments are checked first (a one-line argparse error, never a
    traceback): --batch and --width shape the model entries, --repeats the number of interleaved
    rounds."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all",
                   choices=["model", "metrics", "loader", "step", "infer", "gpu", "all"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--config", default="HCP")
    p.add_argument("--no-torchrun", action="store_true", help="gpu: skip the torchrun epoch")
    args = p.parse_args(argv)
    import metricunet as M
    for flag in ("repeats", "batch", "width"):
        if not getattr(args, flag) > 0:
            p.error(f"--{flag} must be > 0, got {getattr(args, flag)}")
    try:
        args.config = M.get_config(args.config).name
        device = torch.device(args.device)
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is available here")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    entries = {"model": bench_model, "metrics": bench_metrics, "loader": bench_loader,
               "step": bench_step, "infer": bench_infer, "gpu": bench_gpu}
    for name, fn in entries.items():
        if args.what == name or args.what == "all" and name != "gpu":
            print(f"[{name}]")
            fn(args, device)


if __name__ == "__main__":
    main()
