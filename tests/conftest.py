import warnings

import pytest

warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def tiny_pipe():
    from fgbg.models import random_pipeline
    return random_pipeline("tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    """``tiny_pipe`` on one thread: the tiny UNet gains nothing from more, and the machine's
    cores are shared."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_pipe
    torch.set_num_threads(n)


@pytest.fixture()
def mini_dataset(tmp_path):
    """A small mini-world course dataset (2 train, 1 val, 3 test, 2 distractor)."""
    from fgbg.miniworld import write_course_dataset
    return write_course_dataset(tmp_path / "mini", n_train=2, n_val=1, n_test=3, n_distractor=2, seed=3)


def declare_m_pre_run(out_dir, config='{"seed": 0}'):
    """Record a step-2 run in ``out_dir`` for tests that write M_pre PNGs by hand (steps 3-4
    refuse to start without one)."""
    from fgbg.io import atomic_write_text
    from fgbg.masks import prelim_dir
    atomic_write_text(prelim_dir(out_dir) / "run_config.json", config)
