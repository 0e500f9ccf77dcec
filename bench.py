"""Speed measurements, nanoGPT-style: each entry runs the things it compares side by side in one process,
repeated and interleaved, and prints medians and their ratio. Not a test; nothing here asserts.

    python bench.py model            # SGD step of UNet vs MetricUNet-HCP, Table I width, batch 30x3x64x64
    python bench.py metrics          # HD95 + ASD cropped to the masks' bounding box vs whole-volume transform
    python bench.py loader           # Stage-2 patches/s the loader delivers vs what a training step consumes
    python bench.py infer            # one phantom case through Stage 1 + Stage 2 (paper width and CPU preset)
    python bench.py all
Add --device cuda on a GPU machine.
"""
import argparse
import statistics
import time

import torch


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_model(args, device):
    """Section IV-D: "MetricUNet-HP only takes less than 10% additional training time compared with U-Net"."""
    import metricunet as M
    torch.manual_seed(0)
    N, H = args.batch, 64
    x = torch.randn(N, 3, H, H, device=device)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij")
    disc = ((yy - 32) ** 2 + (xx - 28) ** 2 <= 15 ** 2).long().to(device)
    labels = disc.expand(N, H, H).clone()
    labels[::3] = 0                                       # a third of the patches hold no prostate, as in training
    runs = {}
    for name in ("UNet", args.config):
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
        runs[name] = step
    for fn in runs.values():                              # warm-up
        timed(fn, device)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):                         # interleaved so drift hits both alike
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:>8}: median {med[name]*1000:9.1f} ms/step over {len(t)} steps "
              f"(min {min(t)*1000:.1f}, max {max(t)*1000:.1f})")
    print(f"  overhead of MetricUNet-{args.config} over UNet: {100 * (med[args.config] / med['UNet'] - 1):+.2f} %"
          f"  (paper: < 10 %)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["model", "metrics", "loader", "infer", "all"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--config", default="HCP")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    entries = {"model": bench_model}
    for name, fn in entries.items():
        if args.what in (name, "all"):
            print(f"[{name}]")
            fn(args, device)


if __name__ == "__main__":
    main()
