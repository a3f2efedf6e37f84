"""How long does a checkpoint stop training? Written and uploaded in the step vs ours.

    python benchmarks/checkpoint.py [--model mae_vit_large_patch16 --checkpoints 2] [--address RAY_ADDRESS]

One Ray Train worker holds the state of a `--model` run: its weights and AdamW's two moments
(about 4 GB for ViT-L). For each storage, a local folder and an S3-compatible server (moto,
started by this script on 127.0.0.1 in its own process), it takes `--checkpoints`
checkpoints each way with `pipelines.worker.state.CheckpointWriter`. On S3 the state is
`--s3-model`'s (default ViT-B, 1.3 GB): moto assembles a multipart upload in memory, several
copies of it at once (17 GB resident for one 4 GB object, measured), more than a 24 GB
machine holds beside the worker's two copies of a ViT-L state.
  (a) synchronous: the step waits while checkpoint.pth is written and uploaded (what
      `ray.train.report(checkpoint=...)` does by default);
  (b) ours: the step waits while the state is copied off the device; writing and uploading
      run in Ray Train's background thread.
The stall is the time the training thread spends in the checkpoint call. Between two of
ours the worker keeps training (matrix products) until the upload is done, so that each
stall is one checkpoint's, and the background time is reported too. Last line: JSON with,
per storage, the mean stalls, `ratio` = (a)/(b), and the checkpoint's size.

The worker runs on a Ray of its own (2 CPUs), or with `--address` on a running cluster on
this machine (moto listens on 127.0.0.1; it takes any credentials, the cluster's included).
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.storage import open_storage  # noqa: E402
from mae import create_model  # noqa: E402
from mae.recipe import build_optimizer  # noqa: E402
from pipelines.worker.checkpointing import CheckpointWriter
from pipelines.worker.state import State  # noqa: E402


def train_fn(config: dict) -> None:
    torch.manual_seed(0)
    model = create_model(config["model"])
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    for p in model.parameters():  # AdamW's moments exist after its first step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = State(model, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    storage = config["storage"]
    work = torch.randn(256, 256)
    out = {}
    for mode in ("synchronous", "ours"):
        writer = CheckpointWriter(storage, synchronous=mode == "synchronous")
        background = []
        for k in range(config["checkpoints"]):
            state.step = k
            writer.submit(state, {"args": {}, "config": {}}, {"mode": mode, "k": k}, f"checkpoint_{mode}_{k}")
            t0 = time.perf_counter()
            while not writer.idle.is_set():  # training goes on while the checkpoint is uploaded
                work = torch.tanh(work @ work)
            background.append(time.perf_counter() - t0)
        out[mode] = {"stall_s": writer.stalls, "background_s": background}
    last = f"checkpoint_ours_{config['checkpoints'] - 1}/checkpoint.pth"
    out["bytes"] = storage.fs.get_file_info(storage.path(last)).size
    storage.write("result.json", json.dumps(out))


def run(storage_path: str, model: str, args, endpoint: str | None = None) -> dict:
    storage = open_storage(storage_path, endpoint)
    trainer = TorchTrainer(
        train_fn, train_loop_config={"model": model, "checkpoints": args.checkpoints,
                                     "storage": storage.child("checkpoint-bench")},
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name="checkpoint-bench", storage_path=storage.root,
                                       storage_filesystem=storage.fs,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
    trainer.fit()
    result = json.loads(storage.child("checkpoint-bench").read("result.json"))
    sync = sum(result["synchronous"]["stall_s"]) / args.checkpoints
    ours = sum(result["ours"]["stall_s"]) / args.checkpoints
    return {"model": model, "synchronous_stall_s": round(sync, 3), "ours_stall_s": round(ours, 3),
            "ratio": round(sync / ours, 2),
            "ours_background_s": round(sum(result["ours"]["background_s"]) / args.checkpoints, 3),
            "checkpoint_gb": round(result["bytes"] / 1e9, 3), "checkpoint_bytes": result["bytes"]}


def s3_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process (it holds the objects in memory), with a bucket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True,
                              force_virtual_addressing=False).create_dir("bench")
            return proc, endpoint
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mae_vit_large_patch16")
    ap.add_argument("--checkpoints", type=int, default=2, help="checkpoints taken each way, per storage")
    ap.add_argument("--s3-model", default="mae_vit_base_patch16", help="the state checkpointed to S3 (see above)")
    ap.add_argument("--storage", choices=["local", "s3"], nargs="+", default=["local", "s3"])
    ap.add_argument("--address", help="run on this running Ray cluster on this machine (default: a Ray of its own)")
    args = ap.parse_args()
    # moto takes any credentials; the Ray workers inherit these from this process
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=2,  # a Ray of its own, even beside a running cluster
                 include_dashboard=False, log_to_driver=False)
    local = tempfile.mkdtemp(prefix="checkpoint-bench-")
    proc, endpoint = s3_server()
    try:
        results = {}
        for where, path, model in (("local", local, args.model), ("s3", "s3://bench/runs", args.s3_model)):
            if where not in args.storage:
                continue
            results[where] = run(path, model, args, endpoint)
            print(f"{where}: {results[where]}", file=sys.stderr, flush=True)
    finally:
        proc.kill()
        shutil.rmtree(local, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
