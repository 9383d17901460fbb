"""dtype "auto" follows what the GPU computes natively, not what torch can emulate.

No GPU is needed: a T4 (compute capability 7.5) and an A100 (8.0) are simulated by
monkeypatching torch.cuda. On both, ``is_bf16_supported`` is made to say True, as current
torch does on a T4 (it counts emulation), so a rule that still asked it would pick bf16
on the T4 and fail here.
"""
import pytest
import torch

from fgbg import finetune, models

CUDA = torch.device("cuda")


def _simulate_gpu(monkeypatch, capability):
    asked = []

    def get_device_capability(device=None):
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts
    return asked


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16),    # T4
                                                  ((7, 0), torch.float16),    # V100
                                                  ((8, 0), torch.bfloat16),   # A100
                                                  ((9, 0), torch.bfloat16)])  # H100
def test_auto_dtype_follows_native_support(monkeypatch, capability, expected):
    asked = _simulate_gpu(monkeypatch, capability)
    assert models.pick_device() == CUDA
    assert models.native_half_dtype(CUDA) == expected
    assert models.pick_dtype(CUDA) == expected
    assert models.pick_dtype(CUDA, "auto") == expected
    assert finetune._autocast_dtype(CUDA, "auto") == expected
    assert asked, "the capability of the device was never asked"


@pytest.mark.parametrize("capability", [(7, 5), (8, 0)])
def test_explicit_dtype_wins(monkeypatch, capability):
    _simulate_gpu(monkeypatch, capability)
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        assert models.pick_dtype(CUDA, name) == dt
        assert models.pick_dtype(CUDA, dt) == dt
    assert finetune._autocast_dtype(CUDA, "bf16") == torch.bfloat16
    assert finetune._autocast_dtype(CUDA, "fp16") == torch.float16
    assert finetune._autocast_dtype(CUDA, "no") is None


def test_cpu_and_mps(monkeypatch):
    _simulate_gpu(monkeypatch, (9, 0))  # a GPU in the machine does not change the CPU's dtype
    cpu = torch.device("cpu")
    assert models.pick_dtype(cpu) == torch.float32
    assert finetune._autocast_dtype(cpu, "auto") is None  # fine-tuning on the CPU: fp32
    assert models.pick_dtype(torch.device("mps")) == torch.float16


def test_finetune_uses_the_one_rule(monkeypatch):
    """_autocast_dtype("auto") on CUDA is whatever models.native_half_dtype says: the rule
    lives in one place."""
    seen = []

    def rule(device):
        seen.append(device)
        return torch.float64  # a value no copy of the rule would give

    monkeypatch.setattr(models, "native_half_dtype", rule)
    assert finetune._autocast_dtype(CUDA, "auto") is torch.float64
    assert models.pick_dtype(CUDA) is torch.float64
    assert seen == [CUDA, CUDA]
