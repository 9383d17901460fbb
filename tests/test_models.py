import pytest
import torch

from fgbg import models


def test_saved_pipeline_loads_like_sd(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "p", safe_serialization=True)
    assert list((tmp_path / "p" / "unet").glob("*.safetensors"))
    pipe = models.load_pipeline(str(tmp_path / "p"), device="cpu")
    assert pipe.unet.dtype == torch.float32  # fp32 on CPU
    x = torch.randn(1, 4, 16, 16)
    c = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    t = torch.tensor([500])
    torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=c).sample,
                               tiny_pipe.unet(x, t, encoder_hidden_states=c).sample)
    assert models.canvas_size(pipe) == 64
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_incomplete_folder_names_what_is_missing(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "p")
    import shutil
    shutil.rmtree(tmp_path / "p" / "unet")
    with pytest.raises(models.ModelLoadError, match="missing unet"):
        models.load_pipeline(str(tmp_path / "p"), device="cpu")


def test_unreachable_hub_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelLoadError, match=r"model='teaching'.*local"):
        models.load_pipeline("CompVis/stable-diffusion-v1-4", device="cpu")


def test_dtype_choice():
    assert models.pick_dtype(torch.device("cpu")) == torch.float32
    assert models.pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        models.pick_dtype(torch.device("cpu"), "fp8")


def test_untrained_control_shares_vae_but_not_weights(tiny_pipe):
    from fgbg.course import untrained_copy
    u = untrained_copy(tiny_pipe, seed=1)
    assert u.vae is tiny_pipe.vae and u.unet is not tiny_pipe.unet
    assert tiny_pipe.unet.__class__ is u.unet.__class__
    a = dict(tiny_pipe.unet.named_parameters())["conv_in.weight"]
    b = dict(u.unet.named_parameters())["conv_in.weight"]
    assert a.shape == b.shape and not torch.equal(a, b)
