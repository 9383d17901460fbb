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
    with pytest.raises(models.ModelLoadError, match=r"model='teaching'.*local") as e:
        models.load_pipeline("CompVis/stable-diffusion-v1-4", device="cpu")
    assert "\n" not in str(e.value)  # one line, also in a notebook's error summary
    # the command the installed hub client has (huggingface_hub >= 1 has no huggingface-cli)
    assert "`hf download CompVis/stable-diffusion-v1-4 --local-dir stable-diffusion-v1-4`" in str(e.value)
    assert "huggingface-cli" not in str(e.value)


def test_pickled_weights_are_refused_unless_allowed(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "p", safe_serialization=False)
    assert list((tmp_path / "p" / "unet").glob("*.bin")) and not list((tmp_path / "p" / "unet").glob("*.safetensors"))
    with pytest.raises(models.ModelLoadError, match=r"pickles.*convert.*safetensors.*allow_pickle=True") as e:
        models.load_pipeline(str(tmp_path / "p"), device="cpu")
    assert "\n" not in str(e.value) and "unet" in str(e.value)
    pipe = models.load_pipeline(str(tmp_path / "p"), device="cpu", allow_pickle=True)  # explicit opt-in
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    c = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=c).sample,
                               tiny_pipe.unet(x, t, encoder_hidden_states=c).sample)


def test_every_torch_load_in_fgbg_is_weights_only():
    import ast
    from pathlib import Path
    calls = []
    for f in Path(models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                calls.append((f.name, node.lineno, ok))
    assert calls and [c for c in calls if not c[2]] == []


def test_teaching_checkpoints_never_run_pickled_code(tmp_path, monkeypatch):
    """A checkpoint is data: loading it must not run code, even where torch's default
    is switched back to full unpickling (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""
    import pickle
    from pathlib import Path

    from fgbg import teaching_model

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model": Payload(), "step": 0}, tmp_path / "vae_ckpt.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError):
        teaching_model.assemble_pipeline(tmp_path)
    assert not marker.exists()


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
