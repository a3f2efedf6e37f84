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

from cluster.actors import run_fence
from cluster.lease import Lease, LeaseHeld, UnsafeStore
from cluster.preflight import PreflightError, check_cluster
from cluster.ray_compat import hide_raylet_notices
from cluster.storage import Storage
from mae.checkpoint import CHECKPOINT_FILE
from pipelines.common.config import (
    Config,
    ConfigError,
    DataConfig,
    check_epoch,
    check_pretrained,
    check_run_storage,
    head_classes,
    load_config,
)
from pipelines.common.errors import one_line
from pipelines.data.demo_data import write_digits
from pipelines.data.reading import DataError, Source, count_here
from pipelines.data.stream import count_in_tasks, image_stream, training_stream
from pipelines.driver.trainer import build_trainer
from pipelines.output.console import Follow
from pipelines.output.run_files import best_epoch, ended_by, read_jsonl
from pipelines.worker.job import FIGURE_IMAGES
from pipelines.worker.state import BEST
from pipelines.worker.tasks import task_of


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
    cfg = load_config(args.config, [*args.overrides, *(["run.verbose=true"] if args.verbose else [])], task)
    return args, cfg


def print_plan(cfg: Config, accelerator_rate: float) -> int:
    """`--plan`: the plan of the config on stdout; the data is listed if it is readable here."""
    from pipelines.driver.plan import plan, sample_images
    d = cfg.data
    try:
        source = d.open()
        num_images, note = len(source), f"listed at {d.path}"
    except (DataError, OSError, ValueError) as e:
        source, num_images = None, None
        note = f"ImageNet-1k's count: data.path is not readable here ({str(e).splitlines()[0]})"
    blobs, blobs_note = sample_images(source)
    print(plan(cfg, num_images, note, blobs, blobs_note, accelerator_rate))
    return 0


def count_on_cluster(verbose: bool):
    """`DataConfig.open`'s count for shards that nothing counts: a Parquet shard's footer says
    it (a request or two, read here); bare tars are read through by Ray tasks across the
    cluster (joined first), not by this driver."""
    def count(fs, shards: list[str], fmt: str) -> list[int]:
        if fmt == "parquet":
            return count_here(fs, shards, fmt)
        start_ray(verbose)
        return count_in_tasks(fs, shards, fmt)
    return count


def prepare_data(d: DataConfig, verbose: bool = False) -> Source:
    """The training images, listed and counted (the demo dataset written first if asked)."""
    if d.build_demo and d.format == "imagefolder" and not d.path.startswith("s3://") \
            and not os.path.isdir(os.path.join(d.path, "train")):
        print(f"writing the demo dataset (scikit-learn digits) to {d.path}")
        write_digits(d.path)
    return d.open(count=count_on_cluster(verbose))


@dataclass(frozen=True)
class Classes:
    """Fine-tuning and linear probing: the validation images and the head's classes."""
    val: Source
    num_classes: int


def prepare_classes(cfg: Config, train: Source) -> Classes:
    """The validation source (imagefolder `val/`, or `data.val_path`'s shards) and the number
    of classes, checked against the training data's; the pretrained checkpoint is found."""
    val = cfg.data.open_val(count=count_on_cluster(cfg.run.verbose))
    if train.classes and val.classes and val.classes != train.classes:  # labels index the sorted class names
        raise DataError(f"data.val_path: the validation images have {len(val.classes)} classes, the training "
                        f"images {len(train.classes)} (first differing: "
                        f"{sorted(set(val.classes) ^ set(train.classes))[:3]}); their labels would not match")
    num_classes = head_classes(cfg, train.classes)
    check_pretrained(cfg)
    return Classes(val, num_classes)


def failure_lines(e: ray.train.TrainingFailedError, run_dir) -> list[str]:
    """One line per failed worker, with its rank and node (from attempts.jsonl), instead of
    Ray's dump of every traceback; the tracebacks are in the workers' logs."""
    if not isinstance(e, ray.train.WorkerGroupError) or not e.worker_failures:
        return [one_line(e)[:2000]]
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
        source = prepare_data(cfg.data, cfg.run.verbose)
        check_epoch(cfg, len(source))
        classes = prepare_classes(cfg, source) if task_of(cfg).classifies else None
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    named = f" in {len(source.classes)} classes" if source.classes else ""
    print(f"{len(source)} training images{named} in {len(source.files)} {source.format} "
          f"{'files' if source.format == 'imagefolder' else 'shards'} from {cfg.data.path}")
    if classes is not None:
        print(f"{len(classes.val)} validation images from {classes.val.uri}; {classes.num_classes} classes")
    start_ray(cfg.run.verbose)
    try:
        lease = Lease.acquire(cfg.run_storage(), ttl=cfg.run.lease_ttl_seconds,
                              unsafe_store=cfg.run.lease_without_conditional_writes)
    except (LeaseHeld, UnsafeStore) as e:
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


def start_ray(verbose: bool) -> None:
    """Join the cluster (or start a local one); Ray's processes print to its log files only
    unless `verbose` (pipelines/output/console.py). Once: listing may have joined it to count
    shards (`count_on_cluster`)."""
    if ray.is_initialized():
        return
    ray.init(ignore_reinit_error=True, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the train loop logs progress
    if not verbose:  # a hint about Ray's worker pool (the stream and the train loop start a dozen actors and tasks)
        hide_raylet_notices(lambda text: "worker processes have been started on node" in text)


def preflight(cfg: Config) -> None:
    """The run directory is writable and the cluster can ever hold the workers."""
    accelerator, s = cfg.accelerator, cfg.scaling
    check_run_storage(cfg)
    if s.preflight:
        check_cluster(accelerator, cfg.worker_counts[0], accelerator.worker_resources(s.cpus_per_worker),
                      cfg.data.min_cpus)
    else:
        print("warning: scaling.preflight=false: the cluster's resources are not checked; a request it can "
              "never meet waits for them forever", file=sys.stderr)


def fit(cfg: Config, source: Source, classes: Classes | None) -> ray.train.Result:
    """Stream the data into the trainer and train (the console following the workers' lines)."""
    reserved = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    quiet = not cfg.run.verbose
    stream = training_stream(source, cfg.data, cfg.model.input_size, cfg.train.seed, reserved_cpus=reserved,
                             console=quiet, augment=cfg.augment.view, batch_size=cfg.step_blocks)
    val = None if classes is None else image_stream(classes.val, cfg.data, cfg.model.input_size, cfg.train.seed,
                                                    reserved_cpus=reserved, augment=None, console=quiet)
    with Follow() if quiet else contextlib.nullcontext():
        held_out = source.held_out(FIGURE_IMAGES) if task_of(cfg).figures else []
        return build_trainer(cfg, stream, len(source), held_out, classes and classes.num_classes, val).fit()


def run(cfg: Config, source: Source, lease: Lease, classes: Classes | None = None) -> int:
    """Check the storage and the cluster, then train; the exit status."""
    try:
        preflight(cfg)
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = cfg.run_storage()
    fence_lease(lease)
    if lease.lost:
        return lost(lease)
    handler = signal.getsignal(signal.SIGINT)
    try:
        result = fit(cfg, source, classes)
    except ray.train.TrainingFailedError as e:
        if lease.lost:
            return lost(lease)
        recorded = ended_by(run_dir, ray.get_runtime_context().get_job_id())
        for line in [recorded] if recorded else failure_lines(e, run_dir):
            print(f"error: {line}", file=sys.stderr)
        return 1
    except SystemExit:  # Ray Train's SIGINT handler exits 0 when the controller is gone already
        if lease.lost:
            return lost(lease)
        raise
    finally:
        signal.signal(signal.SIGINT, handler)  # Ray Train's, which aborts its controller, ends with fit()
    if lease.lost:
        return lost(lease)
    error = ended_by(run_dir, ray.get_runtime_context().get_job_id())
    if error is not None:  # an error a restart would meet again: the run ended once, not retried
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(outcome_lines(cfg, run_dir, result)))
    return 0


def fence_lease(lease: Lease) -> None:
    """When the lease is lost: rank 0 is told to write nothing more (`run_fence`), and the run
    is aborted as Ctrl-C aborts it (SIGINT to this process: Ray Train's handler, registered in
    `fit()`, aborts its controller and the workers); the driver then exits 1 (`lost`)."""
    fence = run_fence()

    def stop(why: str) -> None:
        ray.get(fence.set.remote(why))
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # inside fit(): Ray Train's
            os.kill(os.getpid(), signal.SIGINT)

    lease.on_lost(stop)


def lost(lease: Lease) -> int:
    print(f"error: {lease.lost}; this driver stopped the run, which wrote nothing after it learned",
          file=sys.stderr)
    return 1


def outcome_lines(cfg: Config, run_dir: Storage, result: ray.train.Result) -> list[str]:
    """Where the run's outputs are, its last epoch and (classification) its best one."""
    uri, task = run_dir.uri, task_of(cfg)
    lines = [f"run directory: {uri}",
             f"  latest checkpoint: {result.checkpoint.path if result.checkpoint else None}",
             f"  config:            {uri}/config.yaml",
             f"  metrics:           {uri}/metrics.jsonl (per epoch), {uri}/steps.jsonl (per step)",
             f"  loss curve:        {uri}/loss_curve.png"]
    if task.figures:
        lines.append(f"  reconstructions:   {uri}/reconstructions/")
    if result.metrics:
        lines.append(f"  final epoch {result.metrics['epoch']}: train_loss {result.metrics['train_loss']:.4f}")
    best = best_epoch(read_jsonl(run_dir, "metrics.jsonl")) if task.classifies else None
    if best is not None:
        lines += [f"  best checkpoint:   {uri}/{BEST}/{CHECKPOINT_FILE}",
                  f"best val top-1: {best['val_top1']:.2f}% (top-5 {best['val_top5']:.2f}%) at epoch {best['epoch']}"]
    return lines
