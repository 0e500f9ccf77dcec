"""Run train.main under torchrun with instrumentation, for
tests/test_pipeline.py::test_ddp_two_ranks.

Each rank records the patch indices it loaded, the files it wrote through train.py's writers, and a
hash of its final parameters, into PROBE_DIR/rank{R}.json (outside the run folder)."""
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train  # noqa: E402

probe_dir = Path(os.environ["PROBE_DIR"])
rank = int(os.environ.get("RANK", 0))
seen, written, final = [], [], {}

get_item = data.PatchDataset.__getitem__
data.PatchDataset.__getitem__ = lambda self, i: (seen.append(int(i)), get_item(self, i))[1]
save = train.save_checkpoint
train.save_checkpoint = lambda obj, path: (written.append(str(path)), save(obj, path))[1]
csv_write = train.metrics.CsvLog.write
train.metrics.CsvLog.write = lambda self, rows: (written.append(str(self.path)),
                                                 csv_write(self, rows))[1]
train_stage = train.train_stage

# Stand-ins for a slow data set on a real cluster: PROBE_TIMEOUT_S shortens the default process
# group's timeout (as NCCL's 10 minutes would be against hours of preprocessing), PROBE_SLOW_PREP_S
# makes every preprocessed case take that much longer.
if os.environ.get("PROBE_TIMEOUT_S"):
    import datetime
    import torch.distributed as dist
    init = dist.init_process_group
    seconds = float(os.environ["PROBE_TIMEOUT_S"])
    timeout = datetime.timedelta(seconds=seconds)
    train.dist.init_process_group = lambda *a, **k: init(*a, timeout=timeout, **k)
if os.environ.get("PROBE_SLOW_PREP_S"):
    import time
    preprocess = data.preprocess
    data.preprocess = lambda *a, **k: (time.sleep(float(os.environ["PROBE_SLOW_PREP_S"])),
                                       preprocess(*a, **k))[1]


def recording_train_stage(*a, **k):
    model = train_stage(*a, **k)
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    final["params"] = h.hexdigest()
    return model


train.train_stage = recording_train_stage
train.main(sys.argv[1:])
(probe_dir / f"rank{rank}.json").write_text(json.dumps(dict(seen=seen, written=written, **final)))
