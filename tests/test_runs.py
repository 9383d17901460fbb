"""fgbg.runs.progress_bar: rate-limited, and off for headless runs."""
from fgbg.runs import PROGRESS_ENV, progress_bar


def test_progress_bar_is_rate_limited_and_can_be_turned_off(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    bar = progress_bar(range(3))
    assert bar.mininterval == 1.0 and not bar.disable
    assert list(bar) == [0, 1, 2]
    assert progress_bar(range(3), disable=True).disable  # the caller's progress=False
    assert progress_bar(range(3), mininterval=0.1).mininterval == 0.1
    monkeypatch.setenv(PROGRESS_ENV, "0")
    bar = progress_bar(range(3))
    assert bar.disable and list(bar) == [0, 1, 2]  # off, and still iterates
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert not progress_bar(range(3)).disable
