"""The run's time axis, one pure value that the worker, `--plan` and the driver's checks all
read: the peak lr, the batches and optimizer steps of an epoch at a worker-group size, and
the lr at any micro-batch.

The effective batch is the config's at every size, so an epoch has the same number of
optimizer steps (floor(images / effective batch)) at every size, and the lr of its k-th step
is the schedule's at fractional epoch `epoch + k / steps_per_epoch`.
"""
from dataclasses import dataclass

from mae.recipe import fractional_epoch, lr_at, scaled_lr


@dataclass(frozen=True)
class Schedule:
    iters_per_epoch: int  # data batches per worker per epoch (the reference's len(loader))
    accum_iter: int
    peak_lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    images_per_step: int  # the effective batch
    log_every_steps: int = 20
    checkpoint_every_steps: int = 0  # 0: at epoch ends only

    @classmethod
    def of(cls, cfg, num_images: int, world: int) -> "Schedule":
        """The schedule of `cfg` (a pipelines.common.config.Config, which imports this
        module) over `num_images` per epoch at `world` workers: each worker gets an equal
        share of the stream in whole batches, the last batch dropped."""
        o, t = cfg.optim, cfg.train
        return cls(iters_per_epoch=(num_images // world) // t.batch_size, accum_iter=cfg.accum_iter(world),
                   peak_lr=cls.peak_lr_of(cfg), min_lr=o.min_lr,
                   warmup_epochs=o.warmup_epochs, epochs=t.epochs, images_per_step=cfg.effective_batch,
                   log_every_steps=t.log_every_steps, checkpoint_every_steps=t.checkpoint_every_steps)

    @staticmethod
    def peak_lr_of(cfg) -> float:
        """optim.lr, or else optim.blr scaled by the effective batch: the lr after warm-up."""
        return cfg.optim.lr or scaled_lr(cfg.optim.blr, cfg.effective_batch)

    @property
    def steps_per_epoch(self) -> int:
        return self.iters_per_epoch // self.accum_iter

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_epochs * self.steps_per_epoch)

    def fraction(self, epoch: int, iteration: int) -> float:
        """The fractional epoch of the optimizer step that micro-batch `iteration` belongs to."""
        return fractional_epoch(epoch, iteration // self.accum_iter, self.steps_per_epoch)

    def lr(self, epoch: int, iteration: int) -> float:
        return lr_at(self.fraction(epoch, iteration), self.peak_lr, self.min_lr, self.warmup_epochs, self.epochs)
