import warnings

import pytest

warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def tiny_pipe():
    from fgbg.models import random_pipeline
    return random_pipeline("tiny", seed=0)


@pytest.fixture()
def mini_dataset(tmp_path):
    """A small mini-world course dataset (2 train, 1 val, 3 test, 2 distractor)."""
    from fgbg.miniworld import write_course_dataset
    return write_course_dataset(tmp_path / "mini", n_train=2, n_val=1, n_test=3, n_distractor=2, seed=3)
