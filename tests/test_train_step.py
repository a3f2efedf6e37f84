"""The training step: compiled vs eager, precisions, gradient accumulation under DDP."""
import socket

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mae import create_model
from mae.recipe import build_optimizer
from pipelines.worker.step import StepConfig, masking_noise, micro_step, optimizer_step

CPU = torch.device("cpu")


def _tiny(seed=0):
    torch.manual_seed(seed)
    return create_model("mae_vit_tiny_patch4", img_size=16, norm_pix_loss=True)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=g)


def _noise(n, seed=1):
    return torch.rand(n, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_compiled_and_eager_give_the_same_loss():
    eager = _tiny()
    compiled = _tiny()
    compiled.compile()
    imgs, noise = _images(4).permute(0, 3, 1, 2).float() / 255, _noise(4)
    loss_e, pred_e, _ = eager(imgs, noise=noise)
    loss_c, pred_c, _ = compiled(imgs, noise=noise)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred_c, pred_e, rtol=1e-4, atol=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # keys stay the official ones


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_fp32_and_bf16_steps_decrease_the_loss(precision):
    model = _tiny()
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    imgs, noise = _images(8), _noise(8)
    losses = []
    for _ in range(15):
        losses.append(micro_step(model, imgs, StepConfig(CPU, 0.75, 1, precision), scaler, noise=noise).item())
        optimizer_step(opt, scaler)
    assert losses[-1] < 0.8 * losses[0]


def test_accumulating_k_micro_batches_equals_one_step_on_k_times_the_batch(process_group):
    k, n = 4, 3
    imgs, noise = _images(k * n), _noise(k * n)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    big = _tiny()
    micro_step(big, imgs, StepConfig(CPU, 0.75, accum_iter=1), scaler, noise=noise)

    accum = DistributedDataParallel(_tiny())
    for i in range(k):
        part = slice(i * n, (i + 1) * n)
        micro_step(accum, imgs[part], StepConfig(CPU, 0.75, accum_iter=k), scaler, sync_grads=i == k - 1,
                   noise=noise[part])

    for (name, p_big), p_acc in zip(big.named_parameters(), accum.module.parameters()):
        if p_big.requires_grad:
            torch.testing.assert_close(p_acc.grad, p_big.grad, rtol=1e-4, atol=1e-7, msg=name)

    # and the optimizer steps that follow land on the same weights (SGD: linear in the gradient)
    sgd_big = torch.optim.SGD([p for p in big.parameters() if p.requires_grad], lr=0.1)
    sgd_acc = torch.optim.SGD([p for p in accum.parameters() if p.requires_grad], lr=0.1)
    optimizer_step(sgd_big, scaler)
    optimizer_step(sgd_acc, scaler)
    for p_big, p_acc in zip(big.parameters(), accum.module.parameters()):
        torch.testing.assert_close(p_acc, p_big, rtol=1e-5, atol=1e-7)


def test_an_images_mask_follows_from_the_seed_the_epoch_and_its_position_alone():
    """The masking noise of an image is the same whichever micro-batch (of whichever worker)
    holds it, and new for another epoch or seed; its mask keeps the ratio's share of patches."""
    a = masking_noise(0, 1, [5, 6, 7], 16)
    assert torch.equal(masking_noise(0, 1, [7, 5], 16), a[[2, 0]])
    assert not torch.equal(a[0], a[1])  # neighbouring positions: unrelated draws
    for other in (masking_noise(0, 2, [5], 16), masking_noise(1, 1, [5], 16)):
        assert not torch.equal(other[0], a[0])
    assert a.shape == (3, 16) and bool(((a >= 0) & (a < 1)).all())
    _, _, mask = _tiny()(_images(3).permute(0, 3, 1, 2).float() / 255, mask_ratio=0.75, noise=a)
    assert mask.sum(1).tolist() == [12.0] * 3
    assert torch.equal(mask[0], _tiny()(_images(1).permute(0, 3, 1, 2).float() / 255, 0.75, a[:1])[2][0])


@pytest.mark.parametrize("num_images", [1797, 1437, 4096 * 3 + 17])
def test_every_worker_count_gives_the_same_steps_and_lr_per_step(num_images):
    from pipelines.common.config import load_config
    from pipelines.common.schedule import Schedule
    cfg = load_config("configs/debug.yaml", ["scaling.min_workers=1", "scaling.num_workers=6", "train.batch_size=4",
                                             "train.effective_batch=240", "train.epochs=3", "optim.warmup_epochs=1"])
    schedules = {w: Schedule.of(cfg, num_images, w) for w in cfg.worker_counts}
    assert {s.steps_per_epoch for s in schedules.values()} == {num_images // 240}
    assert {s.images_per_step for s in schedules.values()} == {240}
    for epoch in range(3):
        lrs = {w: [s.lr(epoch, k * s.accum_iter) for k in range(s.steps_per_epoch)] for w, s in schedules.items()}
        assert all(v == lrs[1] for v in lrs.values())
