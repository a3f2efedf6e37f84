"""Hugging Face transformers' ViTMAEForPreTraining: our checkpoints exported to it give the
same loss, reconstruction and mask for the same noise; its folders (ours, or saved by
transformers itself) read back as a run.resume_from."""
import json

import pytest
import torch

from mae import create_model
from mae.export import save_hf, state_from_hf, state_to_hf
from mae.model import preset
from pipelines.common.config import RunConfig
from pipelines.export import main
from pipelines.worker.state import read_resume_from

transformers = pytest.importorskip("transformers")  # the `hf` extra; installed with `test`
TINY = "mae_vit_tiny_patch4"


def perturbed(name: str, img_size: int | None = None, norm_pix_loss: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, norm_pix_loss=norm_pix_loss, **({"img_size": img_size} if img_size else {}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def assert_same_outputs(model: torch.nn.Module, folder, img_size: int, batch: int = 2):
    hf = transformers.ViTMAEForPreTraining.from_pretrained(folder).eval()
    mask_ratio = hf.config.mask_ratio  # transformers takes it from the config, we as an argument
    torch.manual_seed(1)
    imgs = torch.randn(batch, 3, img_size, img_size)
    noise = torch.rand(batch, model.patch_embed.num_patches)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(out.mask, mask)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(out.logits, pred, rtol=1e-5, atol=1e-5 * pred.abs().max().item())


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_tiny_export_loads_in_transformers_with_the_same_loss_and_reconstruction(tmp_path, norm_pix_loss):
    model = perturbed(TINY, 16, norm_pix_loss)
    save_hf(model.state_dict(), preset(TINY), 16, norm_pix_loss, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["norm_pix_loss"] is norm_pix_loss and config["layer_norm_eps"] == 1e-6
    assert_same_outputs(model, tmp_path / "hf", 16, batch=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"])
def test_paper_presets_export_with_the_same_loss_and_reconstruction(tmp_path, name):
    model = perturbed(name, norm_pix_loss=True)
    save_hf(model.state_dict(), preset(name), 224, True, tmp_path / "hf")
    assert_same_outputs(model, tmp_path / "hf", 224, batch=1)


def test_names_round_trip_both_ways_and_from_transformers_own_names():
    state = perturbed(TINY, 16).state_dict()
    back = state_from_hf(state_to_hf(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    config = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                       decoder_num_attention_heads=2, decoder_intermediate_size=32, image_size=16,
                                       patch_size=4)
    theirs = transformers.ViTMAEForPreTraining(config).state_dict()  # transformers 5 names its tensors its way
    ours = create_model(TINY, img_size=16)
    ours.load_state_dict(state_from_hf(theirs), strict=True)


def test_cli_writes_the_folder_and_resume_from_reads_it_back(tmp_path, capsys):
    model = perturbed(TINY, 16, norm_pix_loss=True)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "config": {"model": {"name": TINY, "input_size": 16,
                                                                  "norm_pix_loss": True, "mask_ratio": 0.6}}}, path)
    assert main(["--checkpoint", str(path), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "ViTMAEForPreTraining (mae_vit_tiny_patch4, 16px, norm_pix_loss=True)" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["mask_ratio"] == 0.6
    assert_same_outputs(model, tmp_path / "hf", 16)

    ckpt, source = read_resume_from(RunConfig(resume_from=str(tmp_path / "hf")))
    assert source.endswith("(Hugging Face ViTMAE)")
    fresh = create_model(TINY, img_size=16)
    fresh.load_state_dict(ckpt["model"], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))

    # a folder transformers itself saved (its own tensor names) reads back too
    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "saved")
    ckpt, _ = read_resume_from(RunConfig(resume_from=str(tmp_path / "saved")))
    fresh.load_state_dict(ckpt["model"], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_a_folder_without_the_files_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="without config.json and model.safetensors"):
        read_resume_from(RunConfig(resume_from=str(tmp_path)))
