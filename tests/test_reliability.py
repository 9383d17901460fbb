"""No silent wrong results, nothing lost: each failure mode of a dataset run, and what fgbg does.

docs/reliability.md lists these failure modes with the test that backs each one.
"""
import copy
import errno
import json

import numpy as np
import pytest
from PIL import Image

from conftest import declare_m_pre_run
from fgbg import attention, evaluate, masks, runs
from fgbg import finetune as ft
from fgbg.data import dataset_identity, load_dataset, read_mask
from fgbg.io import save_png
from fgbg.runs import OutputError, RunConfigError, RunLockedError


def _step1(pipe, ds, out, **kw):
    return attention.save_attention_maps(pipe, ds, out, rev_diff_steps=2, num_inference_steps=50,
                                         progress=False, **kw)


def _maps(out, ds):
    return {it.key: attention.load_attention(out, it)[0] for it in ds}


# --------------------------------------------------------------------------- kill
def test_a_run_killed_during_an_overwrite_leaves_no_output_of_the_old_setting(tiny_pipe, mini_dataset, tmp_path,
                                                                              monkeypatch):
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    _step1(tiny_pipe, ds, out, seed=0)
    old = _maps(out, ds)
    # the overwrite with seed 1 is killed while computing its second image
    real, calls = attention.compute_attention_maps, []

    def dies_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # like a kill: no clean-up in fgbg's code
        return real(*a, **k)
    monkeypatch.setattr(attention, "compute_attention_maps", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        _step1(tiny_pipe, ds, out, seed=1, overwrite=True)
    monkeypatch.setattr(attention, "compute_attention_maps", real)
    # the rerun (no overwrite) declares seed 1 and must not reuse any seed-0 map
    rep = _step1(tiny_pipe, ds, out, seed=1)
    assert len(rep.reused) == 1 and len(rep.done) == len(ds) - 1
    _step1(tiny_pipe, ds, tmp_path / "fresh", seed=1)
    new, fresh = _maps(out, ds), _maps(tmp_path / "fresh", ds)
    for k in fresh:
        np.testing.assert_array_equal(new[k], fresh[k])
        assert not np.array_equal(new[k], old[k])


def test_a_truncated_or_empty_output_is_recomputed_not_trusted(tiny_pipe, mini_dataset, tmp_path):
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    _step1(tiny_pipe, ds, out)
    good = _maps(out, ds)
    empty, cut = (attention.attention_path(out, it) for it in ds.items[:2])
    empty.write_bytes(b"")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    rep = _step1(tiny_pipe, ds, out)
    assert sorted(rep.done) == sorted(it.key for it in ds.items[:2]) and len(rep.reused) == len(ds) - 2
    for k, v in _maps(out, ds).items():
        np.testing.assert_array_equal(v, good[k])
    # step 2 skips (and names) an unreadable map instead of aborting the run
    empty.write_bytes(b"")
    rep2 = masks.preliminary_masks(ds, out, progress=False)
    assert [rel for rel, _ in rep2.skipped] == [ds.items[0].rel] and str(empty) in rep2.skipped[0][1]
    assert len(rep2.done) == len(ds) - 1


def test_is_complete_opens_what_it_checks(tmp_path):
    p = tmp_path / "m.png"
    save_png(p, np.full((20, 20), 255, np.uint8))
    assert runs.is_complete(p)
    p.write_bytes(p.read_bytes()[:-20])
    assert not runs.is_complete(p)
    assert not runs.is_complete(tmp_path / "missing.npz")
    (tmp_path / "zero.npy").write_bytes(b"")
    assert not runs.is_complete(tmp_path / "zero.npy")


def test_leftovers_of_interrupted_writes_are_removed(tiny_pipe, mini_dataset, tmp_path):
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    _step1(tiny_pipe, ds, out)
    orphan = out / "attention" / "images" / "test" / ".test_0000.npz.abc123.tmp"
    orphan.write_bytes(b"half")
    _step1(tiny_pipe, ds, out)
    assert not orphan.exists()


# --------------------------------------------------------------------------- disk full, no permission
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_stops_the_run_at_once(tiny_pipe, mini_dataset, tmp_path, monkeypatch, code):
    import fgbg.io
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    real, calls = attention.compute_attention_maps, []
    monkeypatch.setattr(attention, "compute_attention_maps", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_atomic = fgbg.io._atomic

    def full(path, write):
        if path.suffix == ".npz":
            raise OSError(code, "simulated", str(path))
        return real_atomic(path, write)
    monkeypatch.setattr(fgbg.io, "_atomic", full)
    with pytest.raises(OutputError, match="simulated.*the run stops"):
        _step1(tiny_pipe, ds, out)
    assert len(calls) == 1  # not computed and dropped for every remaining image
    assert not (out / "skipped.txt").exists()


def test_permission_denied_on_out_dir_stops_but_on_one_image_skips(tmp_path):
    from fgbg.data import Item
    items = [Item(rel=f"images/{k}.png", split=0, image_path=tmp_path / f"{k}.png", gt_path=None, line=k + 1)
             for k in range(3)]
    out = tmp_path / "out"

    def denied_here(item):
        raise PermissionError(errno.EACCES, "Permission denied", str(out / "attention" / f"{item.key}.npz"))
    with pytest.raises(OutputError, match="Permission denied"):
        runs.for_each_item("s", items, lambda it: [out / "none"], denied_here, out_dir=out, progress=False)

    def denied_there(item):
        raise PermissionError(errno.EACCES, "Permission denied", str(item.image_path))
    rep = runs.for_each_item("s", items, lambda it: [out / "none"], denied_there, out_dir=out, progress=False)
    assert len(rep.skipped) == 3


# --------------------------------------------------------------------------- wrong dataset, other setting
def test_a_second_dataset_with_the_same_file_names_is_refused(tiny_pipe, tmp_path):
    from fgbg.miniworld import write_course_dataset
    a = write_course_dataset(tmp_path / "a", n_train=1, n_val=0, n_test=2, n_distractor=0, seed=1)
    b = write_course_dataset(tmp_path / "b", n_train=1, n_val=0, n_test=2, n_distractor=0, seed=5)
    out = tmp_path / "out"
    _step1(tiny_pipe, load_dataset(a), out)
    with pytest.raises(RunConfigError, match="dataset"):
        _step1(tiny_pipe, load_dataset(b), out)
    # the same dataset with a smaller limit shares the outputs
    assert len(_step1(tiny_pipe, load_dataset(a, limit=1), out).reused) == 1
    # same folder, same names, other contents: another dataset too
    write_course_dataset(tmp_path / "a", n_train=1, n_val=0, n_test=2, n_distractor=0, seed=5)
    with pytest.raises(RunConfigError, match="dataset"):
        _step1(tiny_pipe, load_dataset(a), out)


def test_dataset_identity_ignores_splits_and_limit_but_not_contents(mini_dataset):
    full = dataset_identity(load_dataset(mini_dataset, splits=["train", "test"]))
    assert dataset_identity(load_dataset(mini_dataset, limit=1).items) == full
    img = load_dataset(mini_dataset).items[0].image_path
    img.write_bytes(img.read_bytes() + b"\0")
    assert dataset_identity(load_dataset(mini_dataset))["fingerprint"] != full["fingerprint"]


def test_finetune_refuses_a_model_trained_on_other_images(tiny_pipe, mini_dataset, tmp_path):
    ds = load_dataset(mini_dataset, splits=["train", "val"])
    out = tmp_path / "out"
    for it in ds.items:
        save_png(masks.prelim_mask_path(out, it), read_mask(it.gt_path).astype(np.uint8) * 255)
    declare_m_pre_run(out)
    cfg = ft.FinetuneConfig(steps=1, batch_size=1, seed=0)
    ft.finetune(copy.deepcopy(tiny_pipe), ds.items[:1], out, cfg, progress=False)
    with pytest.raises(RunConfigError, match="items"):
        ft.finetune(copy.deepcopy(tiny_pipe), ds.items[:2], out, cfg, progress=False)
    res = ft.finetune(copy.deepcopy(tiny_pipe), ds.items[:2], out, cfg, progress=False, overwrite=True)
    assert not res["reused"]
    done = json.loads((out / "finetuned" / "done.json").read_text())
    assert done["items"] == 2 and done["config"]["items"]["n"] == 2


# --------------------------------------------------------------------------- concurrent run
def test_a_second_process_on_the_same_step_is_refused(tiny_pipe, mini_dataset, tmp_path):
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    with runs.step_lock(out / "attention"):  # another run holds the step (flock: per open file)
        with pytest.raises(RunLockedError, match="another process"):
            _step1(tiny_pipe, ds, out)
    assert len(_step1(tiny_pipe, ds, out).done) == len(ds)  # released with its holder


# --------------------------------------------------------------------------- metrics of this run only
def test_metrics_of_another_run_are_never_shown_as_this_runs(tiny_pipe, mini_dataset, tmp_path):
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    _step1(tiny_pipe, ds, out)
    masks.preliminary_masks(ds, out, progress=False)
    src = [out / "attention", masks.prelim_dir(out)]
    m, _ = evaluate.evaluate_steps12(ds.items, out)
    evaluate.update_metrics(out, m, items=ds.items, sources=src)
    evaluate.update_metrics(out, {"refined": {"iou": 0.5}}, items=ds.items, sources=[masks.prelim_dir(out)])
    # a smaller run into the same out_dir: the big run's rows are gone, not merged
    small = load_dataset(mini_dataset, splits=["test"], limit=1)
    m1, _ = evaluate.evaluate_steps12(small.items, out)
    cur = evaluate.update_metrics(out, m1, items=small.items, sources=src)
    assert "refined" not in cur and cur["n_images"] == m1["n_images"]
    assert cur["run"]["test_images"]["n"] == 1
    # M_pre recomputed with another seed: rows made from the old M_pre are left out
    masks.preliminary_masks(ds, out, seed=1, overwrite=True, progress=False)
    cur, stale = evaluate.current_metrics(out)
    assert "prelim" in stale and "prelim" not in cur


# --------------------------------------------------------------------------- the image list
def test_images_sharing_an_output_key_are_refused_naming_both(tmp_path):
    base = tmp_path / "ds"
    (base / "images" / "t").mkdir(parents=True)
    for name in ("a.png", "a.jpg", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(base / "images" / "t" / name)
    (base / "images.txt").write_text("images/t/a.png 0\nimages/t/a.jpg 0\nimages/t/b.png 0\n"
                                     "images/./t/b.png 0\nimages//t/b.png 0\n")
    ds = load_dataset(base)
    assert [it.rel for it in ds] == ["images/t/a.png", "images/t/b.png"]
    why = dict(ds.skipped)
    assert "a.jpg" in why["images.txt line 2"] and "a.png" in why["images.txt line 2"]
    assert "repeats line 3" in why["images.txt line 4"] and "repeats line 3" in why["images.txt line 5"]


def test_bad_lines_of_the_image_list_are_named_and_skipped(tmp_path):
    base = tmp_path / "ds"
    (base / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(base / "images" / "ok.png")
    (base / "images.txt").write_bytes(b"images/ok.png 0\n. 0\nimages/\xff\xfe.png 0\n.\n")
    ds = load_dataset(base)
    assert [it.rel for it in ds] == ["images/ok.png"]
    lines = sorted(what for what, _ in ds.skipped)
    assert lines == ["images.txt line 2", "images.txt line 3", "images.txt line 4"]
    assert "UTF-8" in dict(ds.skipped)["images.txt line 3"]
    summary = ds.summary()
    assert "images.txt line 3" in summary and "UTF-8" in summary and "1 images" in summary


# --------------------------------------------------------------------------- out_dir and base_dir
def _fake_repo(tmp_path):
    root = tmp_path / "course"
    (root / "notebooks").mkdir(parents=True)
    (root / "fgbg").mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "fgbg"\n')
    return root


@pytest.mark.parametrize("where", ["", "root", "parent", "copy"])
def test_an_out_dir_that_would_overwrite_the_course_is_refused(tmp_path, where):
    from fgbg.course import check_out_dir
    from fgbg.params import ParameterError
    root = _fake_repo(tmp_path)
    out = {"": "", "root": root, "parent": tmp_path, "copy": tmp_path / "elsewhere"}[where]
    if where == "copy":
        (out / "fgbg").mkdir(parents=True)
    with pytest.raises(ParameterError, match="out_dir"):
        check_out_dir(out, root)
    mine = root / "runs" / "mine"
    (mine / "notebooks").mkdir(parents=True)  # the executed notebooks of an earlier run
    assert check_out_dir(mine, root) == mine


def test_setup_resolves_the_default_paths_against_the_repository(tmp_path, monkeypatch):
    from fgbg import course
    from fgbg.params import ParameterError
    root = _fake_repo(tmp_path)
    monkeypatch.chdir(root / "notebooks")  # where JupyterLab starts a notebook's kernel
    monkeypatch.delenv(course.OUT_DIR_ENV, raising=False)
    (root / "data" / "ds").mkdir(parents=True)
    P = course.setup({"base_dir": "data/ds", "out_dir": "runs/x", "make_mini_world": False})
    assert P["out_dir"] == str(root / "runs" / "x") and P["base_dir"] == str(root / "data" / "ds")
    with pytest.raises(ParameterError, match="out_dir"):
        course.setup({"base_dir": "data/ds", "out_dir": ".", "make_mini_world": False})


def test_the_mini_world_is_written_only_where_that_is_safe(tmp_path):
    from fgbg.course import COURSE_DATA, prepare_mini_world
    from fgbg.params import ParameterError
    root = _fake_repo(tmp_path)
    users = tmp_path / "my_photos"
    users.mkdir()
    (users / "README.txt").write_text("my notes")
    with pytest.raises(ParameterError, match="no images.txt"):
        prepare_mini_world(users, root, seed=0)
    assert (users / "README.txt").read_text() == "my notes" and len(list(users.iterdir())) == 1
    with pytest.raises(ParameterError, match="does not exist"):  # a typo is not a place for synthetic data
        prepare_mini_world(tmp_path / "my_photoz", root, seed=0)
    assert not (tmp_path / "my_photoz").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "wrote" in prepare_mini_world(empty, root, seed=0) and (empty / "images.txt").exists()
    assert prepare_mini_world(empty, root, seed=0) is None  # already a mini world: left as it is
    own = (root / COURSE_DATA).resolve()
    assert "wrote" in prepare_mini_world(own, root, seed=0) and (own / "miniworld.json").exists()
