"""The driver's TorchTrainer of a run: the workers' scaling and resources from the config's
accelerator (its row of cluster/accelerators.py), the run directory on its storage, restarts,
checkpoints kept, the datasets (the stream's two lanes, the validation stream) and the
WorkerJob every worker is handed."""
import copy

import ray
import ray.train
from ray.train.torch import TorchTrainer

from cluster.torch_backend import AcceleratorTorchConfig
from pipelines.common.config import Config
from pipelines.data.lanes import NAMES as LANES
from pipelines.data.lanes import Lanes
from pipelines.worker.job import JOB, VAL, WorkerJob


def build_trainer(cfg: Config, stream: Lanes, num_images: int, held_out: list[bytes] = (),
                  num_classes: int | None = None, val: ray.data.Dataset | None = None) -> TorchTrainer:
    """The TorchTrainer of a run over `stream`'s lanes (rows: uint8 HWC `image`, `label`,
    `skipped`) of `num_images` per epoch; `held_out`: encoded images for the figures
    (pretraining); `num_classes` and `val`: the classes and the validation stream
    (fine-tuning, linear probing)."""
    root, accelerator, s = cfg.storage_root(), cfg.accelerator, cfg.scaling
    workers = s.num_workers if s.min_workers is None else (s.min_workers, s.num_workers)
    datasets = dict(zip(LANES, stream.datasets))
    if val is not None:
        datasets[VAL] = val
    job = WorkerJob(cfg, num_images, root.child(cfg.run.name), stream.key, list(held_out), num_classes,
                    val is not None)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={JOB: job},
        torch_config=AcceleratorTorchConfig(accelerator=accelerator),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=accelerator.resource == "GPU",
                                               resources_per_worker=accelerator.worker_resources(s.cpus_per_worker),
                                               elastic_resize_monitor_interval_s=s.resize_check_seconds),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=root.root, storage_filesystem=root.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
        datasets=datasets,
        dataset_config=ordered_lanes(),
    )


def train_loop_per_worker(config: dict) -> None:
    """What Ray Train runs on every worker: pipelines/worker/loop.py's loop, imported where a
    worker runs it. The driver only hands this function to its TorchTrainer, and so never
    loads the model's code (timm, torchvision: over a second of CPU per run)."""
    from pipelines.worker.loop import train_loop_per_worker as loop
    loop(config)


def ordered_lanes() -> ray.train.DataConfig:
    """Ray Train's dataset config, with the lanes' blocks kept in their read order
    (`preserve_order`) through each worker's split: the split then hands blocks out in turn
    by rows (Ray Data's equal split, without locality), so which rows reach which worker
    depends on the stream's seed only (pipelines/data/stream.py: `training_stream`)."""
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)  # what Ray Train would use
    options.preserve_order = True
    return ray.train.DataConfig(execution_options={name: options for name in LANES})
