import torch

from mae import create_model
from mae.transforms import eval_resize_crop
from mae.visualize import grid_png, reconstruct, to_display, unnormalize_pred


def test_perfect_prediction_reproduces_the_image():
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4", img_size=16, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 16, 16)
    target = model.patchify(imgs)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    perfect = (target - mean) / (var + 1e-6) ** 0.5  # what a zero-loss model predicts
    torch.testing.assert_close(model.unpatchify(unnormalize_pred(perfect, target, True)), imgs, atol=1e-5, rtol=0)
    assert torch.equal(unnormalize_pred(target, target, False), target)


def test_reconstruction_panels_mask_and_paste():
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4", img_size=16)
    imgs = torch.randn(3, 3, 16, 16)
    panels = reconstruct(model, imgs, 0.75, noise=torch.rand(3, 16))
    assert panels.shape == (3, 4, 16, 16, 3) and 0 <= panels.min() and panels.max() <= 1
    original, masked, recon, pasted = panels.unbind(1)
    torch.testing.assert_close(original, to_display(imgs))
    visible = (masked != to_display(torch.zeros_like(imgs))).any(-1)  # masked pixels show the mean colour
    assert 0.2 < visible.float().mean() < 0.3  # 25% of the patches stay visible
    assert torch.equal(pasted[visible], original[visible])


def test_grid_png_and_eval_crop():
    png = grid_png(torch.rand(2, 4, 8, 8, 3), cell=32, title="epoch 3")
    assert png[:4] == b"\x89PNG"
    crop = eval_resize_crop(torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8), 32)
    assert crop.shape == (32, 32, 3) and crop.dtype == torch.uint8
