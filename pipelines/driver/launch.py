"""The driver of a run (pipelines/pretrain.py, finetune.py, linprobe.py): parse the command line,
check the config, the data, the storage and the cluster, take the run directory's lease, build
the stream and the trainer, and report how the run ended."""
import argparse
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass

import ray
import ray.train
from ray.train.torch import TorchTrainer

from cluster.lease import Lease, LeaseHeld
from cluster.preflight import PreflightError, check_cluster
from cluster.ray_compat import hide_raylet_notices
from cluster.torch_backend import AcceleratorTorchConfig
from mae.checkpoint import CHECKPOINT_FILE
from pipelines.common.config import Config, ConfigError, DataConfig, load_config, to_yaml
from pipelines.data.demo_data import write_digits
from pipelines.data.reading import DataError, Source, open_source
from pipelines.output.console import Follow
from pipelines.output.run_files import ended_by, read_jsonl
from pipelines.data.lanes import NAMES as LANES, Lanes
from pipelines.data.stream import image_stream, training_stream
from pipelines.worker.loop import VAL, train_loop_per_worker
from pipelines.worker.state import BEST, locate_pretrained


ENTRY_POINTS = {"pretrain": "pipelines/pretrain.py", "finetune": "pipelines/finetune.py",
                "linprobe": "pipelines/linprobe.py"}


def parse_args(argv=None, task: str = "pretrain", doc: str = "") -> tuple[argparse.Namespace, Config]:
    """The command line of the entry point of `task`; its config must be one of that task."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML recipe under configs/")
    ap.add_argument("--plan", action="store_true",
                    help="print what the config will do (batch, lr, steps, resources, model size, checkpoint size, "
                         "input and decode rates) and exit, without training or a cluster")
    ap.add_argument("--accelerator-rate", type=float, default=1000.0, metavar="IMAGES_PER_S",
                    help="--plan: training images/s each accelerator consumes (default 1000)")
    ap.add_argument("--verbose", action="store_true",
                    help="show everything Ray's processes print (as run.verbose=true)")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, *(["run.verbose=true"] if args.verbose else [])])
    if cfg.train.task != task:
        raise ConfigError(f"train.task: {args.config} is a {cfg.train.task} config; run it with "
                          f"{ENTRY_POINTS[cfg.train.task]}, or give {ENTRY_POINTS[task]} a {task} config")
    return args, cfg


def print_plan(cfg: Config, accelerator_rate: float) -> int:
    """`--plan`: the plan of the config on stdout; the data is listed if it is readable here."""
    from pipelines.driver.plan import plan, sample_images
    d = cfg.data
    try:
        source = open_source(d.format, d.path, d.s3_endpoint, d.s3_region, d.s3_credentials_file)
        num_images, note = len(source), f"listed at {d.path}"
    except (DataError, OSError, ValueError) as e:
        source, num_images = None, None
        note = f"ImageNet-1k's count: data.path is not readable here ({str(e).splitlines()[0]})"
    blobs, blobs_note = sample_images(source)
    print(plan(cfg, num_images, note, blobs, blobs_note, accelerator_rate))
    return 0


def prepare_data(d: DataConfig) -> Source:
    """The training images, listed and counted (the demo dataset written first if asked)."""
    if d.build_demo and d.format == "imagefolder" and not d.path.startswith("s3://") \
            and not os.path.isdir(os.path.join(d.path, "train")):
        print(f"writing the demo dataset (scikit-learn digits) to {d.path}")
        write_digits(d.path)
    return open_source(d.format, d.path, d.s3_endpoint, d.s3_region, d.s3_credentials_file)


@dataclass(frozen=True)
class Classes:
    """Fine-tuning and linear probing: the validation images and the head's classes."""
    val: Source
    num_classes: int


def prepare_classes(cfg: Config, train: Source) -> Classes:
    """The validation source (imagefolder `val/`, or `data.val_path`'s shards) and the number
    of classes, checked against the training data's; the pretrained checkpoint is found."""
    d = cfg.data
    if d.val_path is None and d.format != "imagefolder":
        raise ConfigError(f"data.val_path: {d.format} shards need it (a folder, glob or brace pattern of the "
                          "validation shards)")
    if d.val_path is None:
        val = open_source(d.format, d.path, d.s3_endpoint, d.s3_region, d.s3_credentials_file, split="val")
    elif d.format == "imagefolder":  # <val_path>/<class>/<image>
        root, _, split = d.val_path.rstrip("/").rpartition("/")
        val = open_source(d.format, root, d.s3_endpoint, d.s3_region, d.s3_credentials_file, split=split)
    else:
        val = open_source(d.format, d.val_path, d.s3_endpoint, d.s3_region, d.s3_credentials_file)
    if train.classes and val.classes and val.classes != train.classes:  # labels index the sorted class names
        raise DataError(f"data.val_path: the validation images have {len(val.classes)} classes, the training "
                        f"images {len(train.classes)} (first differing: "
                        f"{sorted(set(val.classes) ^ set(train.classes))[:3]}); their labels would not match")
    num_classes = cfg.model.num_classes or len(train.classes)
    if num_classes < 2:
        raise ConfigError("model.num_classes: the data names no classes (no class folders or classes.json); set it")
    if cfg.model.checkpoint:
        try:
            locate_pretrained(cfg)
        except (FileNotFoundError, OSError) as e:
            raise ConfigError(str(e) if isinstance(e, FileNotFoundError) else
                              f"model.checkpoint: cannot read {cfg.model.checkpoint}: {e}") from None
    return Classes(val, num_classes)


def check_epoch(cfg: Config, num_images: int) -> None:
    """Every worker count the run may have gives an epoch at least one optimizer step: each
    worker gets an equal share of the stream in whole batches, the last batch dropped."""
    t = cfg.train
    for workers in cfg.worker_counts:
        batches = (num_images // workers) // t.batch_size
        if batches < cfg.accum_iter(workers):
            raise ConfigError(
                f"train.batch_size: {num_images} images over {workers} workers give {batches} batches of "
                f"{t.batch_size} per epoch, fewer than the {cfg.accum_iter(workers)} micro-batches of one "
                f"optimizer step of {cfg.effective_batch} images")


def check_storage(cfg: Config) -> None:
    """The run directory is writable: write the resolved config into it."""
    storage = cfg.run_storage()
    try:
        storage.write("config.yaml", to_yaml(cfg))
    except OSError as e:
        raise ConfigError(f"run.storage_path: cannot write the run directory {storage.uri}: {e}") from None


def build_trainer(cfg: Config, stream: Lanes, num_images: int, held_out: list[bytes],
                  classes: Classes | None = None, val: ray.data.Dataset | None = None) -> TorchTrainer:
    """The TorchTrainer of a run over `stream`'s lanes (rows: uint8 HWC `image`, `label`,
    `skipped`) of `num_images` per epoch; `held_out`: encoded images for the figures
    (pretraining); `classes` and `val`: the classes and the validation stream (fine-tuning,
    linear probing)."""
    root, row, s = cfg.storage_root(), cfg.accelerator, cfg.scaling
    workers = s.num_workers if s.min_workers is None else (s.min_workers, s.num_workers)
    datasets = dict(zip(LANES, stream.datasets))
    if val is not None:
        datasets[VAL] = val
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "num_images": num_images, "storage": root.child(cfg.run.name),
                           "stream": stream.key, "held_out": held_out, "val": val is not None,
                           "num_classes": classes.num_classes if classes else None},
        torch_config=AcceleratorTorchConfig(accelerator=row),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=row.resource == "GPU",
                                               resources_per_worker=row.worker_resources(s.cpus_per_worker),
                                               elastic_resize_monitor_interval_s=s.resize_check_seconds),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=root.root, storage_filesystem=root.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
        datasets=datasets,
    )


def failure_lines(e: ray.train.TrainingFailedError, run_dir) -> list[str]:
    """One line per failed worker, with its rank and node (from attempts.jsonl), instead of
    Ray's dump of every traceback; the tracebacks are in the workers' logs."""
    if not isinstance(e, ray.train.WorkerGroupError) or not e.worker_failures:
        return [" ".join(str(e).split())[:2000]]
    attempts = read_jsonl(run_dir, "attempts.jsonl")
    nodes = {w["rank"]: w["node_ip"] for w in (attempts[-1].get("workers") or [])} if attempts else {}
    lines = []
    for rank, failure in sorted(e.worker_failures.items()):
        last = next((line for line in reversed(str(failure).strip().splitlines()) if line.strip()), repr(failure))
        lines.append(f"rank {rank} on {nodes.get(rank, 'its node')}: {last.strip()}")
    return lines + ["(the full tracebacks are in the workers' logs, under the Ray session's logs/ folder)"]


def main(argv=None, task: str = "pretrain", doc: str = "") -> int:
    """The entry point of `task` (pipelines/pretrain.py, finetune.py, linprobe.py)."""
    try:
        args, cfg = parse_args(argv, task, doc)
        if args.plan:
            return print_plan(cfg, args.accelerator_rate)
        source = prepare_data(cfg.data)
        check_epoch(cfg, len(source))
        classes = prepare_classes(cfg, source) if task != "pretrain" else None
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    named = f" in {len(source.classes)} classes" if source.classes else ""
    print(f"{len(source)} training images{named} in {len(source.files)} {source.format} "
          f"{'files' if source.format == 'imagefolder' else 'shards'} from {cfg.data.path}")
    if classes is not None:
        print(f"{len(classes.val)} validation images from {classes.val.uri}; {classes.num_classes} classes")
    verbose = cfg.run.verbose  # else Ray's processes print to its log files only: pipelines/output/console.py
    ray.init(ignore_reinit_error=True, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the train loop logs progress
    if not verbose:  # a hint about Ray's worker pool (the stream and the train loop start a dozen actors and tasks)
        hide_raylet_notices(lambda text: "worker processes have been started on node" in text)
    try:
        lease = Lease.acquire(cfg.run_storage(), ttl=cfg.run.lease_ttl_seconds)
    except LeaseHeld as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: run.storage_path: cannot write the run directory {cfg.run_storage().uri}: {e}",
              file=sys.stderr)
        return 2
    # `ray job stop` sends SIGTERM: exit through the `with`, which gives the lease back, so that
    # the run can be submitted again at once (a driver killed outright leaves it to expire)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with lease:  # renewed until the run ends
        return run(cfg, source, lease, classes)


def run(cfg: Config, source: Source, lease: Lease, classes: Classes | None = None) -> int:
    """Check the storage and the cluster, then train; the exit status."""
    row, s = cfg.accelerator, cfg.scaling
    try:
        check_storage(cfg)
        if s.preflight:
            check_cluster(row, cfg.worker_counts[0], row.worker_resources(s.cpus_per_worker), cfg.data.min_cpus)
        else:
            print("warning: scaling.preflight=false: the cluster's resources are not checked; a request it can "
                  "never meet waits for them forever", file=sys.stderr)
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reserved = s.num_workers * s.cpus_per_worker
    stream = training_stream(source, cfg.data, cfg.model.input_size, cfg.train.seed, reserved_cpus=reserved,
                             console=not cfg.run.verbose, augment=cfg.augment.view)
    val = None if classes is None else image_stream(classes.val, cfg.data, cfg.model.input_size, cfg.train.seed,
                                                    reserved_cpus=reserved, augment=None, console=not cfg.run.verbose)
    run_dir = cfg.run_storage()
    try:
        with contextlib.nullcontext() if cfg.run.verbose else Follow():
            held_out = source.held_out(8) if classes is None else []
            result = build_trainer(cfg, stream, len(source), held_out, classes, val).fit()
    except ray.train.TrainingFailedError as e:
        recorded = ended_by(run_dir, ray.get_runtime_context().get_job_id())
        for line in [recorded] if recorded else failure_lines(e, run_dir):
            print(f"error: {line}", file=sys.stderr)
        return 1
    if lease.lost:
        print(f"warning: this run's lease was lost while it trained ({lease.lost}): another driver may have "
              "written the run directory too", file=sys.stderr)
    error = ended_by(run_dir, ray.get_runtime_context().get_job_id())
    if error is not None:  # an error a restart would meet again: the run ended once, not retried
        print(f"error: {error}", file=sys.stderr)
        return 1
    uri = run_dir.uri
    print(f"run directory: {uri}")
    print(f"  latest checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    print(f"  config:            {uri}/config.yaml")
    print(f"  metrics:           {uri}/metrics.jsonl (per epoch), {uri}/steps.jsonl (per step)")
    print(f"  loss curve:        {uri}/loss_curve.png")
    if classes is None:
        print(f"  reconstructions:   {uri}/reconstructions/")
    if result.metrics:
        print(f"  final epoch {result.metrics['epoch']}: train_loss {result.metrics['train_loss']:.4f}")
    if classes is not None:
        best = max(read_jsonl(run_dir, "metrics.jsonl"), key=lambda m: m.get("val_top1", -1.0), default=None)
        if best is not None and "val_top1" in best:
            print(f"  best checkpoint:   {uri}/{BEST}/{CHECKPOINT_FILE}")
            print(f"best val top-1: {best['val_top1']:.2f}% (top-5 {best['val_top5']:.2f}%) at epoch {best['epoch']}")
    return 0

