"""Typed run configuration: one dataclass per component, filled from YAML, then overridden
by dotted `section.key=value` arguments. Unknown keys and bad values are errors that name
the key and what is allowed. Every check of a config lives here: `validate()` for the config
alone, and, below it, the few that need the data listed (`check_epoch`, `head_classes`,
`DataConfig.open_val`)."""
import dataclasses
import importlib.util
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import yaml

from cluster.accelerators import ACCELERATORS, Accelerator, resolve
from cluster.storage import (
    CredentialsError,
    Storage,
    is_uri,
    open_storage,
    read_credentials,
)
from mae.presets import list_models, preset
from pipelines.common.checkpoints import locate_checkpoint
from pipelines.common.schedule import Schedule

if TYPE_CHECKING:
    from pipelines.data.reading import Source

ENTRY_POINTS = {"pretrain": "pipelines/pretrain.py", "finetune": "pipelines/finetune.py",
                "linprobe": "pipelines/linprobe.py"}


class ConfigError(ValueError):
    """A bad configuration: the message names the key and what is allowed."""


@dataclass
class ModelConfig:
    name: str = "mae_vit_large_patch16"
    """Preset from `mae.list_models()`."""
    input_size: int = 224
    """Side of the square crops fed to the model (must match the preset's img_size)."""
    mask_ratio: float = 0.75
    """Fraction of patches removed."""
    norm_pix_loss: bool = True
    """Regress per-patch normalised pixels (the paper's default for its best results)."""
    checkpoint: str | None = None
    """Fine-tuning and linear probing: the pretrained MAE whose encoder the classifier starts
    from: a run directory of ours (its latest checkpoint), a checkpoint file of ours or an
    official .pth (path or s3:// URL); null: random weights (the baseline a pretrained start
    must beat)."""
    num_classes: int | None = None
    """Fine-tuning and linear probing: classes of the head; null: the data's (its class
    folders, or the shards' classes.json)."""
    global_pool: bool = True
    """Fine-tuning: classify the mean of the patch tokens through a fresh fc_norm (the
    paper's recipe); false: the class token after the encoder's norm. Linear probing always
    takes the class token."""
    drop_path: float = 0.0
    """Fine-tuning: stochastic depth rate (0.1 ViT-B, 0.2 ViT-L, 0.3 ViT-H in the paper)."""


@dataclass
class DataConfig:
    path: str = ""
    """Where the training images are: a local/NFS path or s3://bucket/prefix. imagefolder:
    the root holding `train/<class>/<image>`; webdataset/parquet: a folder of shards, a glob
    (`shards/train-*.tar`) or a brace pattern (`imagenet1k-train-{0000..1023}.tar`)."""
    format: Literal["imagefolder", "webdataset", "parquet"] = "imagefolder"
    """Layout of `path`: ImageNet's class folders, WebDataset tar shards (image member
    .jpg/.jpeg/.png with a .cls label) or Parquet shards (`image` struct with `bytes`,
    integer `label`)."""
    s3_endpoint: str | None = None
    """Endpoint of the S3-compatible store holding `path` (MinIO, Ceph), e.g.
    http://10.0.0.5:9000; null: AWS S3 (or AWS_ENDPOINT_URL)."""
    s3_region: str | None = None
    """Region of the data bucket (S3 proper)."""
    s3_credentials_file: str | None = None
    """An AWS shared-credentials file (`[default]` with aws_access_key_id and
    aws_secret_access_key), mode 600, holding the data bucket's keys; null: the usual AWS
    environment variables / files / instance role of each node. Keys themselves are never
    config values (they would show in `ray job list`, the dashboard and config.yaml)."""
    val_path: str | None = None
    """Fine-tuning and linear probing: the validation images, evaluated after every epoch;
    null: `<path>/val/<class>/<image>` of an imagefolder (shards need it set: a folder, glob
    or brace pattern of validation shards in `format`)."""
    build_demo: bool = False
    """If `path` holds no data, write the bundled demo dataset (handwritten digits) there."""
    decode_batch_size: int = 256
    """Images per decode + crop call and per block leaving the decoders (a read task's
    last block takes up to half as many more, so no short block trails it)."""
    decode_cpus: float = 1.0
    """CPUs each decode task reserves."""
    decode_concurrency: int | None = None
    """Most decode tasks running at once; null: the cluster's CPUs left by the training
    workers / decode_cpus."""
    read_files_per_task: int = 1024
    """Most images per read task: imagefolder files, Parquet rows (a shard is split by row
    groups) or tar samples. Each task streams out blocks of `decode_batch_size`. There are
    at least four read units per decoder where the data can be split that far: with fewer
    shards than that, a Parquet shard splits by row groups and a tar by byte ranges (each
    read task finds its first sample from the tar's headers itself: nothing of the tar is
    read to plan them), so no decoder waits on one long task at the end of an epoch."""
    prefetch_batches: int = 4
    """Batches each training worker keeps ready ahead of the one it trains on."""
    object_store_memory: int | None = None
    """Most bytes of decoded crops the stream holds ahead of training (queued, prefetched
    or being decoded); null: three blocks per decode task plus two, at most half the
    object store."""
    max_pixels: int = 90_000_000
    """Largest image decoded, in pixels, read from its header before anything is allocated
    (ImageNet's largest is about 20 MP); a larger one is skipped and counted."""
    max_image_bytes: int = 64 * 2**20
    """Largest encoded image read; a larger file or tar member is skipped unread."""
    read_retries: int = 3
    """Retries of a transient storage error (connection lost, throttled, EIO) per read;
    what still fails is skipped, counted and logged with its shard and position."""
    retry_backoff_seconds: float = 0.5
    """Wait before the first retry; doubled before each next one."""
    min_cpus: float = 1.0
    """CPUs that must remain for decoding beyond the training workers' reservation; the
    preflight fails at once if the cluster cannot spare them."""

    def open(self, path: str | None = None, split: str = "train", count=None) -> "Source":
        """The images at `path` (null: `data.path`) in `data.format`, listed and counted,
        through this section's S3 endpoint, region and credentials; `split`: the
        imagefolder's folder under `path` (train, val); `count`: how shards that nothing
        counts are counted (`reading.open_source`; default: by this process)."""
        # imported here: a train worker reads its config, never the data (tests/test_layout.py)
        from pipelines.data.reading import count_here, open_source
        return open_source(self.format, self.path if path is None else path, self.s3_endpoint, self.s3_region,
                           self.s3_credentials_file, split=split, count=count or count_here)

    def open_val(self, count=None) -> "Source":
        """Fine-tuning and linear probing: the validation images, `val_path` (an imagefolder's
        `<val_path>/<class>/<image>`, or shards), or else an imagefolder's `<path>/val/`."""
        if self.val_path is None and self.format != "imagefolder":
            raise ConfigError(f"data.val_path: {self.format} shards need it (a folder, glob or brace pattern of the "
                              "validation shards)")
        if self.val_path is None:
            return self.open(split="val", count=count)
        if self.format == "imagefolder":  # <val_path>/<class>/<image>
            root, _, split = self.val_path.rstrip("/").rpartition("/")
            return self.open(root, split, count)
        return self.open(self.val_path, count=count)


@dataclass
class AugmentConfig:
    """The training view of each image. Decoders (CPU): RandomResizedCrop (bicubic) with
    scale (min_scale, 1), horizontal flip, then RandAugment. Training worker (on the
    device): random erasing after normalisation, then Mixup / CutMix of the batch."""
    min_scale: float = 0.2
    """Smallest crop area, as a fraction of the image (pretraining 0.2, classification 0.08)."""
    rand_augment: str | None = None
    """timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1 (fine-tuning); null: none."""
    reprob: float = 0.0
    """Fine-tuning: probability of timm's random erasing (per-pixel noise) per image."""
    mixup: float = 0.0
    """Fine-tuning: Mixup alpha (0: off); with cutmix, each batch draws one of the two."""
    cutmix: float = 0.0
    """Fine-tuning: CutMix alpha (0: off)."""
    smoothing: float = 0.0
    """Fine-tuning: label smoothing (into the Mixup targets when Mixup or CutMix is on)."""

    @property
    def view(self):
        """The decoders' part of it, as `mae.view.Augment` (no pixel code: the driver calls this)."""
        from mae.view import Augment
        return Augment((self.min_scale, 1.0), self.rand_augment)


@dataclass
class OptimConfig:
    blr: float = 1.5e-4
    """Base learning rate: lr = blr * effective_batch / 256."""
    lr: float | None = None
    """Absolute learning rate; when set, `blr` is ignored."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    weight_decay: float = 0.05
    """AdamW weight decay on weights (biases and norms get none)."""
    warmup_epochs: float = 40
    """Linear warmup length in epochs."""
    layer_decay: float = 1.0
    """Fine-tuning: layer-wise lr decay, block i's lr scaled by layer_decay ** (blocks + 1 - (i + 1))
    (0.65 ViT-B, 0.75 ViT-L/H in the paper); 1: none."""


@dataclass
class TrainConfig:
    task: Literal["pretrain", "finetune", "linprobe"] = "pretrain"
    """What the run trains: the MAE (pipelines/pretrain.py), a classifier on its encoder with
    every weight trained (pipelines/finetune.py: AdamW with layer decay) or its head only
    (pipelines/linprobe.py: LARS); the entry point must match."""
    epochs: int = 800
    """Total epochs of the schedule; raising it extends a finished run."""
    batch_size: int = 64
    """Images per worker per micro-step."""
    accum_iter: int = 1
    """Micro-steps accumulated per optimizer step (at `scaling.num_workers` workers)."""
    effective_batch: int | None = None
    """Images per optimizer step, the same at every worker count (null: batch_size x
    accum_iter x num_workers). At w workers each step accumulates effective_batch /
    (batch_size x w) micro-steps; a worker count that does not divide it is refused."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype; fp16 uses a gradient scaler."""
    compile: bool = True
    """torch.compile the model (in place; eager where the device does not support it)."""
    seed: int = 0
    """Seed of the weight initialisation and of each worker's masking noise."""
    log_every_steps: int = 20
    """A progress line (and a host sync) every this many optimizer steps."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every this many optimizer steps inside an epoch (0: at epoch ends only)."""


@dataclass
class ScalingConfig:
    num_workers: int = 1
    """Training workers, one accelerator each (with min_workers: the most)."""
    min_workers: int | None = None
    """Elastic: train with as many workers as the cluster can give between min_workers and
    num_workers, fewer when nodes go, more when they come back (Ray Train restarts the
    worker group from the latest checkpoint at its new size), each step on the same images at
    every size (`Config.step_blocks`). null: always num_workers."""
    preflight: bool = True
    """Check before starting that the cluster (with the nodes its autoscaler can launch) can
    ever hold the workers (the minimum of an elastic range); false: skip it, with a warning."""
    resize_check_seconds: float = 60.0
    """Elastic: how often a running group checks whether the cluster can give it another size."""
    accelerator: str = "cpu"
    """Row of `cluster.accelerators.ACCELERATORS`: cpu, cuda, sdaa or npu."""
    device_type: str | None = None
    """Compute on this torch device type instead of the row's, keeping its Ray resource
    (e.g. `cpu` to test scheduling on `sdaa` nodes without the hardware)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved by each training worker; the rest decode data."""


@dataclass
class RunConfig:
    name: str = "mae"
    """Run name: the run directory is `<storage_path>/<name>`; reusing it resumes."""
    storage_path: str = "~/mae_runs"
    """Where run directories live: a local/NFS path or s3://bucket/prefix."""
    s3_endpoint: str | None = None
    """Endpoint of an S3-compatible store (MinIO, Ceph), e.g. http://10.0.0.5:9000.
    Credentials come from the usual AWS environment variables on every node."""
    s3_region: str | None = None
    """Region of the bucket (S3 proper)."""
    s3_credentials_file: str | None = None
    """As `data.s3_credentials_file`, for the run bucket; null: the nodes' AWS environment."""
    keep_checkpoints: int | None = 5
    """How many of the latest checkpoints to keep (null: all)."""
    max_failures: int = 3
    """Worker-group restarts from the latest checkpoint after a worker or node dies (-1:
    unlimited). Errors a restart would meet again (a non-finite loss, a data or config error)
    end the run at once."""
    resume_from: str | None = None
    """Start a run that has no checkpoint yet from this checkpoint (ours or an official MAE
    .pth; a path or s3:// URL). Once the run has its own checkpoints, they take precedence."""
    checkpoint_upload_retries: int = 5
    """Retries of a checkpoint write or upload that failed with an error that may pass (S3
    throttling or 5xx, a lost connection, EIO), 1, 2, 4... s apart (at most 30 s). When they
    are spent, the checkpoint is not registered and the run reports the error (a restart from
    the latest checkpoint, or the run's end when run.max_failures is spent)."""
    checkpoint_timeout_seconds: float = 3600.0
    """The longest the next checkpoint waits for the one in flight (its write, upload and
    retries) before the run stops with an error naming it: a store that hangs."""
    lease_ttl_seconds: float = 60.0
    """The driver renews the run directory's lease (lease.json) every quarter of this. A
    submission that finds a lease watches it: renewed meanwhile, it stops naming the live
    driver; unchanged for this long, it takes it over. A driver that cannot renew for 3/4 of
    this counts its lease lost and stops the run (exit 1)."""
    lease_without_conditional_writes: bool = False
    """Accept an S3 store that ignores conditional writes (If-None-Match / If-Match, found by a
    probe at start): the lease then cannot stop two drivers writing the run together."""
    mlflow_tracking_uri: str | None = None
    """Also log to this MLflow tracking server (e.g. http://mlflow.internal:5000; needs the
    `mlflow` extra): params, per-step loss and lr, per-epoch metrics, figures. Its credentials
    come from MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN on the nodes, never the URI."""
    mlflow_experiment: str = "mae"
    """The MLflow experiment the run logs into (created if missing)."""
    verbose: bool = False
    """Show everything Ray's processes print on the driver's console (false: the run's own
    lines, and its workers' warnings and errors; Ray's internals stay in Ray's log files)."""
    tensorboard: bool = False
    """Also write TensorBoard events (loss, lr, images/s, reconstructions) to <run dir>/tensorboard."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def storage_root(self) -> Storage:
        """`run.storage_path` on its filesystem."""
        return open_storage(self.run.storage_path, self.run.s3_endpoint, self.run.s3_region,
                            self.run.s3_credentials_file)

    def run_storage(self) -> Storage:
        """The run directory, `<run.storage_path>/<run.name>`."""
        return self.storage_root().child(self.run.name)

    @property
    def accelerator(self) -> Accelerator:
        return resolve(self.scaling.accelerator, self.scaling.device_type)

    @property
    def effective_batch(self) -> int:
        """Images per optimizer step, at every worker count."""
        t = self.train
        return t.effective_batch or t.batch_size * t.accum_iter * self.scaling.num_workers

    @property
    def step_blocks(self) -> int | None:
        """Rows per block of the training stream where each step must train the same images at
        every worker count (an elastic run: scaling.min_workers set): train.batch_size; else
        None (blocks of data.decode_batch_size, which Ray Data streams faster: README)."""
        return self.train.batch_size if self.scaling.min_workers is not None else None

    @property
    def worker_counts(self) -> range:
        """The sizes the worker group may have: num_workers, or min_workers..num_workers."""
        s = self.scaling
        return range(s.min_workers or s.num_workers, s.num_workers + 1)

    def accum_iter(self, workers: int) -> int:
        """Micro-steps per optimizer step at `workers` workers: batch x accum x workers is
        the effective batch (validate() refused the counts where it cannot be)."""
        return self.effective_batch // (self.train.batch_size * workers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _coerce(key: str, value, tp):
    """Convert a YAML or command-line value to the declared type of `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        return _coerce(key, value, args[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # YAML's .inf and .nan: no setting means either
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


CREDENTIAL_KEYS = ("access_key", "secret_key", "session_token", "aws_access_key_id", "aws_secret_access_key",
                   "aws_session_token", "s3_access_key", "s3_secret_key", "s3_session_token", "password", "token")


def _refuse_credential(dotted: str) -> None:
    """A credential is never a config value: config values travel in the job's entrypoint
    (`ray job list`, the dashboard), Ray Train's state and config.yaml."""
    section, _, key = dotted.partition(".")
    if key.lower() in CREDENTIAL_KEYS:
        where = f"{section}.s3_credentials_file" if section in ("data", "run") else "s3_credentials_file"
        raise ConfigError(f"{dotted}: credentials are not taken as config values (they would show in "
                          f"`ray job list`, the dashboard and config.yaml); put them in an AWS credentials file "
                          f"readable only by you (chmod 600) and set {where}=PATH, or give every node "
                          f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in its environment")


def _set(cfg: Config, dotted: str, value) -> None:
    _refuse_credential(dotted)
    section, _, key = dotted.partition(".")
    sections = [f.name for f in dataclasses.fields(Config)]
    if section not in sections or not key:
        raise ConfigError(f"{dotted}: unknown section {section!r}; sections are {sections}")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise ConfigError(f"{dotted}: unknown key; {section} has {sorted(hints)}")
    setattr(obj, key, _coerce(dotted, value, hints[key]))


def load_config(path: str | None = None, overrides: list[str] = (), task: str | None = None) -> Config:
    """Defaults <- YAML file <- `section.key=value` overrides, then validated, its local paths
    made absolute; with `task`, the config must be one of that task (its entry point's)."""
    cfg = Config()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: no such file {path!r}")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected sections {[f.name for f in dataclasses.fields(Config)]}")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value)
    for item in overrides:
        dotted, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"{item!r}: overrides look like section.key=value")
        dotted = dotted.strip()
        _refuse_credential(dotted)  # before its value is parsed (a YAML error would print it)
        try:
            parsed = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError as e:
            raise ConfigError(f"{dotted}: cannot parse {value!r}: {str(e).splitlines()[0]}") from None
        _set(cfg, dotted, parsed)
    validate(cfg)
    resolve_paths(cfg)
    if task is not None and cfg.train.task != task:
        raise ConfigError(f"train.task: {path} is a {cfg.train.task} config; run it with "
                          f"{ENTRY_POINTS[cfg.train.task]}, or give {ENTRY_POINTS[task]} a {task} config")
    return cfg


def from_dict(d: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` (as sent to the train workers)."""
    cfg = Config()
    for section, values in d.items():
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value)
    return cfg


def resolve_paths(cfg: Config) -> None:
    """Local paths made absolute, `~` expanded: the workers, on other nodes and in other
    folders, read them too (run after `validate`, which refuses an empty data.path)."""
    for section, key in ((cfg.run, "storage_path"), (cfg.model, "checkpoint"), (cfg.data, "val_path"),
                         (cfg.run, "resume_from"), (cfg.data, "path")):
        value = getattr(section, key)
        if value and not is_uri(value):
            setattr(section, key, os.path.abspath(os.path.expanduser(value)))


# --------------------------------------------------------------------------------------
# Validation: the config alone
# --------------------------------------------------------------------------------------


def validate(cfg: Config) -> None:
    """Every check of the config on its own, section by section; the first bad value raises a
    ConfigError naming its key and what is allowed."""
    _check_model(cfg.model)
    _check_task(cfg)
    _check_data(cfg.data)
    _check_optim(cfg.optim, cfg.train)
    _check_train(cfg.train)
    _check_scaling(cfg)
    _check_batches(cfg)
    _check_lr_range(cfg)
    _check_run(cfg.run)
    _check_credentials(cfg)


def _need(ok: bool, key: str, allowed: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


def _check_model(m: ModelConfig) -> None:
    _need(m.name in list_models(), "model.name", f"choose one of {list_models()}", m.name)
    patch = preset(m.name)["patch_size"]
    _need(m.input_size > 0 and m.input_size % patch == 0, "model.input_size",
          f"must be a positive multiple of {m.name}'s patch size {patch}", m.input_size)
    _need(0.0 < m.mask_ratio < 1.0, "model.mask_ratio", "must be in (0, 1)", m.mask_ratio)


def _check_task(cfg: Config) -> None:
    """The keys one task uses and the others refuse (a fine-tuning key in a pretraining
    config is a mistake, not a no-op), and the classification recipe's values."""
    m, a, o, t = cfg.model, cfg.augment, cfg.optim, cfg.train
    classify = {"model.checkpoint": m.checkpoint is not None, "model.num_classes": m.num_classes is not None,
                "data.val_path": cfg.data.val_path is not None}
    finetune = {"model.drop_path": m.drop_path != 0.0, "augment.reprob": a.reprob != 0.0,
                "augment.mixup": a.mixup != 0.0, "augment.cutmix": a.cutmix != 0.0,
                "augment.smoothing": a.smoothing != 0.0, "optim.layer_decay": o.layer_decay != 1.0,
                "augment.rand_augment": a.rand_augment is not None}
    used = {"pretrain": {}, "finetune": {**classify, **finetune}, "linprobe": classify}[t.task]
    for key, is_set in {**classify, **finetune}.items():
        if is_set and key not in used:
            raise ConfigError(f"{key}: train.task={t.task} does not use it (only "
                              f"{'fine-tuning' if key in finetune else 'fine-tuning and linear probing'} does)")
    if m.num_classes is not None and m.num_classes < 2:
        raise ConfigError(f"model.num_classes: {m.num_classes!r} is not allowed; null (the data's) or >= 2")
    if not 0.0 < a.min_scale <= 1.0:
        raise ConfigError(f"augment.min_scale: {a.min_scale!r} is not allowed; must be in (0, 1]")
    for key, value in (("model.drop_path", m.drop_path), ("augment.reprob", a.reprob),
                       ("augment.smoothing", a.smoothing)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}: {value!r} is not allowed; must be in [0, 1)")
    if a.mixup < 0 or a.cutmix < 0:
        raise ConfigError(f"augment.{'mixup' if a.mixup < 0 else 'cutmix'}: must be >= 0 (0: off)")
    if (a.mixup or a.cutmix) and t.batch_size % 2:
        raise ConfigError(f"train.batch_size: {t.batch_size} is odd; Mixup and CutMix pair each batch's images "
                          "with the batch reversed, which needs an even batch")
    if not 0.0 < o.layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay: {o.layer_decay!r} is not allowed; must be in (0, 1] (1: none)")
    if a.rand_augment is not None:
        from timm.data.auto_augment import rand_augment_transform
        try:
            rand_augment_transform(a.rand_augment, {})
        except (AssertionError, ValueError, KeyError, IndexError) as e:
            raise ConfigError(f"augment.rand_augment: {a.rand_augment!r} is not a timm RandAugment policy "
                              f"(e.g. rand-m9-mstd0.5-inc1): {e}") from None


def _check_data(d: DataConfig) -> None:
    _need(bool(d.path), "data.path", "set it to a folder holding train/<class>/<image> (or shards)", d.path)
    _need(d.path.startswith("s3://") or not is_uri(d.path), "data.path", "a local/NFS path or s3://bucket/prefix",
          d.path)
    _need(d.decode_batch_size >= 1, "data.decode_batch_size", "must be >= 1", d.decode_batch_size)
    _need(d.decode_cpus > 0, "data.decode_cpus", "must be > 0", d.decode_cpus)
    _need(d.decode_concurrency is None or d.decode_concurrency >= 1, "data.decode_concurrency", "null or >= 1",
          d.decode_concurrency)
    _need(d.read_files_per_task >= 1, "data.read_files_per_task", "must be >= 1", d.read_files_per_task)
    _need(d.max_pixels >= 1, "data.max_pixels", "must be >= 1", d.max_pixels)
    _need(d.max_image_bytes >= 1, "data.max_image_bytes", "must be >= 1 (bytes)", d.max_image_bytes)
    _need(d.read_retries >= 0, "data.read_retries", "must be >= 0", d.read_retries)
    _need(d.retry_backoff_seconds >= 0, "data.retry_backoff_seconds", "must be >= 0", d.retry_backoff_seconds)
    _need(d.prefetch_batches >= 0, "data.prefetch_batches", "must be >= 0", d.prefetch_batches)
    _need(d.object_store_memory is None or d.object_store_memory > 0, "data.object_store_memory",
          "null or > 0 (bytes)", d.object_store_memory)
    _need(d.min_cpus >= 0, "data.min_cpus", "must be >= 0", d.min_cpus)


def _check_optim(o: OptimConfig, t: TrainConfig) -> None:
    _need(o.blr > 0, "optim.blr", "must be > 0", o.blr)
    _need(o.lr is None or o.lr > 0, "optim.lr", "must be > 0 or null", o.lr)
    _need(o.min_lr >= 0, "optim.min_lr", "must be >= 0", o.min_lr)
    _need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _need(0 <= o.warmup_epochs < t.epochs, "optim.warmup_epochs",
          f"must be >= 0 and < train.epochs ({t.epochs})", o.warmup_epochs)


def _check_lr_range(cfg: Config) -> None:
    """The schedule falls from its peak to optim.min_lr: a min_lr above the peak would rise."""
    o = cfg.optim
    peak = Schedule.peak_lr_of(cfg)
    _need(o.min_lr <= peak, "optim.min_lr", f"must be <= the peak lr ({peak:.4g}: "
          + ("optim.lr" if o.lr else f"optim.blr {o.blr:g} x effective batch {cfg.effective_batch} / 256") + ")",
          o.min_lr)


def _check_train(t: TrainConfig) -> None:
    _need(t.epochs >= 1, "train.epochs", "must be >= 1", t.epochs)
    _need(t.batch_size >= 1, "train.batch_size", "must be >= 1", t.batch_size)
    _need(t.accum_iter >= 1, "train.accum_iter", "must be >= 1", t.accum_iter)
    _need(t.log_every_steps >= 1, "train.log_every_steps", "must be >= 1", t.log_every_steps)
    _need(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0 (0: epoch ends only)",
          t.checkpoint_every_steps)


def _check_scaling(cfg: Config) -> None:
    """The worker counts and the accelerator (with the precisions it supports)."""
    s = cfg.scaling
    _need(s.num_workers >= 1, "scaling.num_workers", "must be >= 1", s.num_workers)
    _need(s.min_workers is None or 1 <= s.min_workers <= s.num_workers, "scaling.min_workers",
          f"null or from 1 to scaling.num_workers ({s.num_workers})", s.min_workers)
    _need(s.resize_check_seconds > 0, "scaling.resize_check_seconds", "must be > 0", s.resize_check_seconds)
    _need(s.accelerator in ACCELERATORS, "scaling.accelerator", f"choose one of {sorted(ACCELERATORS)}",
          s.accelerator)
    _need(s.cpus_per_worker >= 0, "scaling.cpus_per_worker", "must be >= 0", s.cpus_per_worker)
    device_types = sorted({accelerator.device_type for accelerator in ACCELERATORS.values()})
    _need(s.device_type is None or s.device_type in device_types, "scaling.device_type",
          f"null or one of {device_types}", s.device_type)
    accelerator = cfg.accelerator
    _need(cfg.train.precision in accelerator.amp_dtypes, "train.precision",
          f"{accelerator.device_type} supports {list(accelerator.amp_dtypes)}", cfg.train.precision)


def _check_batches(cfg: Config) -> None:
    """The effective batch splits into micro-batches at every worker count (after the worker
    counts are checked: they divide it)."""
    t, s = cfg.train, cfg.scaling
    _need(t.effective_batch is None or t.effective_batch >= 1, "train.effective_batch", "null or >= 1",
          t.effective_batch)
    if t.effective_batch is not None and t.accum_iter != 1:
        _need(t.effective_batch == t.batch_size * t.accum_iter * s.num_workers, "train.effective_batch",
              f"set it or train.accum_iter, not both (accum_iter {t.accum_iter} x batch_size {t.batch_size} x "
              f"{s.num_workers} workers = {t.batch_size * t.accum_iter * s.num_workers})", t.effective_batch)
    bad = [w for w in cfg.worker_counts if cfg.effective_batch % (t.batch_size * w)]
    _need(not bad, "train.effective_batch",
          f"{cfg.effective_batch} images per step cannot be split into micro-batches of train.batch_size="
          f"{t.batch_size} at {', '.join(map(str, bad))} workers; choose an effective batch that "
          f"batch_size x every worker count in scaling.min_workers..num_workers divides, or narrow that range",
          cfg.effective_batch)


def _check_run(r: RunConfig) -> None:
    _need(bool(r.name) and "/" not in r.name, "run.name", "a non-empty name without '/'", r.name)
    _need(bool(r.storage_path) and (r.storage_path.startswith("s3://") or not is_uri(r.storage_path)),
          "run.storage_path", "a local/NFS folder or s3://bucket/prefix", r.storage_path)
    _need(r.keep_checkpoints is None or r.keep_checkpoints >= 1, "run.keep_checkpoints", "null or >= 1",
          r.keep_checkpoints)
    uri = r.mlflow_tracking_uri or ""
    _need("@" not in uri.partition("://")[2].partition("/")[0], "run.mlflow_tracking_uri",
          "no credentials in the URI (they would show in `ray job list`); set MLFLOW_TRACKING_USERNAME / "
          "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN on the nodes", "<redacted>")
    if uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError("run.mlflow_tracking_uri: mlflow is not installed; pip install -e '.[mlflow]'")
    _need(r.lease_ttl_seconds > 0, "run.lease_ttl_seconds", "must be > 0", r.lease_ttl_seconds)
    _need(r.checkpoint_upload_retries >= 0, "run.checkpoint_upload_retries", "must be >= 0",
          r.checkpoint_upload_retries)
    _need(r.checkpoint_timeout_seconds > 0, "run.checkpoint_timeout_seconds", "must be > 0",
          r.checkpoint_timeout_seconds)
    _need(r.max_failures >= -1, "run.max_failures", "-1 (unlimited) or >= 0", r.max_failures)


def _check_credentials(cfg: Config) -> None:
    """The credentials files are readable by their owner only, and hold a key pair."""
    for key, section in (("data.s3_credentials_file", cfg.data), ("run.s3_credentials_file", cfg.run)):
        if section.s3_credentials_file:
            try:
                read_credentials(section.s3_credentials_file)
            except CredentialsError as e:
                raise ConfigError(f"{key}: {e}") from None


# --------------------------------------------------------------------------------------
# Validation against the data, once it is listed (data.val_path: `DataConfig.open_val`)
# --------------------------------------------------------------------------------------


def check_epoch(cfg: Config, num_images: int) -> None:
    """Every worker count the run may have gives an epoch at least one optimizer step: each
    worker gets an equal share of the stream in whole batches, the last batch dropped."""
    for workers in cfg.worker_counts:
        sched = Schedule.of(cfg, num_images, workers)
        if sched.steps_per_epoch < 1:
            raise ConfigError(
                f"train.batch_size: {num_images} images over {workers} workers give {sched.iters_per_epoch} "
                f"batches of {cfg.train.batch_size} per epoch, fewer than the {sched.accum_iter} micro-batches of "
                f"one optimizer step of {sched.images_per_step} images")


def head_classes(cfg: Config, data_classes: Sequence[str]) -> int:
    """Fine-tuning and linear probing: the classes of the head, `model.num_classes` or those
    the training data names (its class folders, or the shards' classes.json)."""
    num_classes = cfg.model.num_classes or len(data_classes)
    if num_classes < 2:
        raise ConfigError("model.num_classes: the data names no classes (no class folders or classes.json); set it")
    return num_classes


def check_pretrained(cfg: Config) -> None:
    """Fine-tuning and linear probing: `model.checkpoint` (a file, or a run directory's latest
    checkpoint) exists and can be read, before any work starts."""
    if not cfg.model.checkpoint:
        return
    r = cfg.run
    try:
        locate_checkpoint(cfg.model.checkpoint, r.s3_endpoint, r.s3_region, r.s3_credentials_file, "model.checkpoint")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"model.checkpoint: cannot read {cfg.model.checkpoint}: {e}") from None


def check_run_storage(cfg: Config) -> None:
    """The run directory is writable: write the resolved config into it."""
    storage = cfg.run_storage()
    try:
        storage.write("config.yaml", to_yaml(cfg))
    except OSError as e:
        raise ConfigError(f"run.storage_path: cannot write the run directory {storage.uri}: {e}") from None


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
