"""torchrun at scale, on CPU with gloo and loopback only: a default timeout shorter than the data
preparation, two "nodes" in separate folders (node-local disks), a path that one node lacks, and a
resume whose checkpoint only one node holds. tests/ddp_probe.py instruments each process."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from phantom import make_phantom

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width", "0.125", "--stage1-filters", "8", "--batch", "8", "--workers", "0",
        "--log-every", "5", "--no-test"]
# the processes never see a GPU, so the test means the same on a GPU machine
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return make_phantom(tmp_path_factory.mktemp("ddp") / "phantom", cases=4, seed=5, log=None)


def torchrun(args, cwd, probe, port, nnodes=1, node_rank=0, nproc=2, env=None, **kw):
    """One torchrun 'node' on 127.0.0.1 running tests/ddp_probe.py (train.main) from folder cwd."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--node_rank={node_rank}", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(ROOT / "tests" / "ddp_probe.py"), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=dict(ENV, PROBE_DIR=str(probe), **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def two_nodes(args, base, port, env=None):
    """Both 'nodes' of a 1 + 1 process job, each in its own folder (its own relative phantom/,
    data_cache/ and runs/), to the end; returns [(returncode, stdout, stderr)] per node."""
    procs = []
    for node in (0, 1):
        (base / f"node{node}").mkdir(parents=True, exist_ok=True)
        procs.append(torchrun(args, base / f"node{node}", base / "probe", port, nnodes=2,
                              node_rank=node, nproc=1, env=env))
    out = [p.communicate(timeout=400) for p in procs]
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, out)]


def params_of(probe, rank):
    return json.loads((probe / f"rank{rank}.json").read_text())["params"]


def test_data_preparation_longer_than_the_default_timeout(phantom, tmp_path):
    """Each case takes 4 s longer to preprocess than the default group's 3-s timeout allows a rank
    to wait: the waits for data preparation go through the long-timeout group, so the run finishes.
    """
    (tmp_path / "probe").mkdir()
    p = torchrun(["--data", str(phantom), "--cache", str(tmp_path / "cache"), "--out",
                  str(tmp_path / "run"), "--stage", "2", "--epochs2", "1", "--patches", "16",
                  *TINY], tmp_path, tmp_path / "probe", 29561,
                 env=dict(PROBE_TIMEOUT_S="3", PROBE_SLOW_PREP_S="4"))
    out, err = p.communicate(timeout=400)
    assert p.returncode == 0, out[-2000:] + err[-3000:]
    assert params_of(tmp_path / "probe", 0) == params_of(tmp_path / "probe", 1)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4  # the two ranks shared the work


def test_two_nodes_with_their_own_disks(phantom, tmp_path):
    """README's relative default paths on two 'nodes': each makes its own phantom and cache, node 0
    alone holds the run folder. A --data path that only node 0 has stops both, with one line."""
    (tmp_path / "probe").mkdir()
    args = ["--phantom-cases", "4", "--stage", "2", "--epochs2", "1", "--patches", "16", "--out",
            "runs/r", *TINY]
    res = two_nodes(args, tmp_path, 29571)
    for rc, out, err in res:
        assert rc == 0, out[-2000:] + err[-3000:]
    n0, n1 = tmp_path / "node0", tmp_path / "node1"
    assert (n0 / "runs" / "r" / "stage2_last.pt").exists() and not (n1 / "runs").exists()
    assert (n0 / "phantom" / "dataset.json").exists() and (n1 / "phantom" / "dataset.json").exists()
    assert params_of(tmp_path / "probe", 0) == params_of(tmp_path / "probe", 1)
    # a path that exists on node 0 only
    shutil.copytree(phantom, n0 / "mydata")
    t0 = time.time()
    res = two_nodes(["--data", "mydata", "--out", "runs/m", *TINY], tmp_path, 29581)
    assert time.time() - t0 < 120                                       # no wait for a timeout
    for rc, out, err in res:
        assert rc != 0 and "mydata: data folder not found (rank 1)" in err, err[-2000:]
    assert not (n0 / "runs" / "m").exists()


def test_resume_when_only_node_0_holds_the_checkpoint(phantom, tmp_path):
    """Kill a two-node run after its first epoch (node 1 never holds a checkpoint: only rank 0
    writes the run folder), resume both: every rank continues from node 0's checkpoint, to the
    weights of an uninterrupted run."""
    args = ["--data", str(phantom), "--cache", str(tmp_path / "cache"), "--stage", "2", "--epochs2",
            "3", "--patches", "16", "--augment", "spatial", *TINY]
    (tmp_path / "a" / "probe").mkdir(parents=True)
    res = two_nodes(args + ["--out", "run"], tmp_path / "a", 29591)
    assert all(rc == 0 for rc, _, _ in res), res[0][2][-3000:] + res[1][2][-3000:]
    base = tmp_path / "b"
    (base / "probe").mkdir(parents=True)
    procs = []
    for n in (0, 1):
        (base / f"node{n}").mkdir()
        procs.append(torchrun(args + ["--out", "run"], base / f"node{n}", base / "probe", 29601,
                              nnodes=2, node_rank=n, nproc=1))
    deadline = time.time() + 300
    while not (base / "node0" / "run" / "stage2_last.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    for p in procs:  # a crash: no clean-up at all
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
    assert not (base / "node1" / "run" / "stage2_last.pt").exists()
    res = two_nodes(args + ["--out", "run", "--resume"], base, 29611)
    assert all(rc == 0 for rc, _, _ in res), res[0][2][-3000:] + res[1][2][-3000:]
    assert "resumed after epoch" in res[0][1]
    assert params_of(base / "probe", 0) == params_of(base / "probe", 1)    # the ranks agree
    want = torch.load(tmp_path / "a" / "node0" / "run" / "stage2_last.pt", weights_only=True)
    got = torch.load(base / "node0" / "run" / "stage2_last.pt", weights_only=True)
    assert got["epoch"] == want["epoch"] == 2 and got["step"] == want["step"]
    for k in want["model"]:  # the uninterrupted run's weights
        assert torch.allclose(got["model"][k].float(), want["model"][k].float(), atol=1e-6), k
    # another number of processes cannot continue those sampler streams: refused, with one line
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--out", "run", "--resume"],
                       cwd=base / "node0", env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stderr[-2000:]
    assert "written by 2 process(es), this run has 1" in r.stderr, r.stderr[-2000:]


def test_gpu_check_runs_on_a_cpu(capsys):
    """bench.py gpu, the first check on a GPU machine, runs here too (smaller, without torchrun);
    the same dtype twice gives exactly the same gradients, bf16 a small relative error."""
    import bench
    import metricunet as M
    torch.manual_seed(0)
    model = M.build_model("HCP", width=0.125)
    x = torch.randn(2, 3, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 20:44, 16:40] = 1
    cfg = M.get_config("HCP")
    assert bench.gradient_agreement(model, x, labels, cfg, "ce", torch.float32) == 0.0
    assert 0 < bench.gradient_agreement(model, x, labels, cfg, "contour", torch.bfloat16) < 1
    bench.main(["gpu", "--width", "0.125", "--batch", "2", "--repeats", "1", "--no-torchrun"])
    out = capsys.readouterr().out
    assert out.count("bf16 vs fp32 relative error") == 3 and out.count("  step ") == 3


def test_ablation_refuses_torchrun(monkeypatch):
    import ablation
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="not torchrun"):
        ablation.ablation_main([])
