import json

import numpy as np
import pytest

from fgbg import miniworld as mw
from fgbg.data import load_dataset, read_image, read_mask


def test_render_is_deterministic_and_masks_are_exact():
    rng = np.random.default_rng(0)
    scene = mw.random_scene(rng, ["bird", "fish"])
    a, ma = mw.render(scene)
    b, mb = mw.render(scene)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert not (ma[0] & ma[1]).any()  # visible masks of two objects never overlap
    # an object alone on its background: the mask is where the image differs from the bare background
    solo = mw.Scene(scene.background, [scene.objects[0]], scene.seed)
    img, (m,) = mw.render(solo)
    bare, _ = mw.render(mw.Scene(scene.background, [], scene.seed))
    changed = np.abs(img.astype(int) - bare.astype(int)).sum(-1) > 30
    assert (changed & ~m).sum() <= 0.15 * m.sum()  # only anti-aliased edge pixels differ outside
    assert (m & changed).sum() >= 0.8 * m.sum()


def test_captions():
    o = mw.Obj("bird", "orange", 30, 30, 20, 0, False, 0)
    f = mw.Obj("fish", "red", 10, 10, 20, 0, False, 0)
    s = mw.Scene("grass", [o, f])
    assert s.caption() == "a photo of an orange bird and a red fish on grass"
    assert s.caption(colour=False, background=False) == "a photo of a bird and a fish"
    assert mw.Scene("sky", []).caption() == "a photo of the sky"


def test_unseen_words_are_in_no_caption_of_either_world():
    """The step-1 control words: no training caption of v1 or v2 (every colour and the
    background named, every object) contains them, and each is one token, so its map is
    the map of one untrained embedding."""
    from fgbg.sd_parts import CLIP_TOKENIZER_DIR, load_tokenizer
    from fgbg.teaching_model import training_caption
    words = set()
    for world in mw.WORLDS:
        rng = np.random.default_rng(0)
        for _ in range(300):
            scene = mw.corpus_scene(rng, world=world)
            words |= set(training_caption(scene, rng, p_colour=1.0, p_background=1.0).split())
            words |= set(training_caption(scene, rng, p_none=1.0).split())
    assert {"bird", "car", "grass", "red", "photo"} <= words  # the words of the captions were collected
    assert not set(mw.UNSEEN_WORDS) & words
    tok = load_tokenizer(CLIP_TOKENIZER_DIR)
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in mw.UNSEEN_WORDS)


def test_course_dataset_layout(tmp_path):
    base = mw.write_course_dataset(tmp_path / "d", n_train=3, n_val=2, n_test=2, n_distractor=2, seed=1)
    lines = (base / "images.txt").read_text().split("\n")[:-1]
    assert len(lines) == 9 and {ln.split()[1] for ln in lines} == {"0", "1", "2"}
    ds = load_dataset(base, splits=["test"])
    assert len(ds) == 4 and sum(it.distractor_path is not None for it in ds) == 2
    for it in ds:
        gt = read_mask(it.gt_path, (64, 64))
        assert gt.sum() >= 20  # every course image holds a visible bird
        if it.distractor_path:
            assert not (gt & read_mask(it.distractor_path, (64, 64))).any()
    again = mw.write_course_dataset(tmp_path / "e", n_train=3, n_val=2, n_test=2, n_distractor=2, seed=1)
    np.testing.assert_array_equal(read_image(base / lines[0].split()[0]), read_image(again / lines[0].split()[0]))


def test_growing_the_train_split_never_changes_a_test_image(tmp_path, monkeypatch):
    monkeypatch.setattr(mw, "FIRST_TRAIN", 2)  # the first 2 train images share the course stream
    kw = dict(n_val=1, n_test=2, n_distractor=1, seed=1)
    small = mw.write_course_dataset(tmp_path / "a", n_train=2, **kw)
    big = mw.write_course_dataset(tmp_path / "b", n_train=5, **kw)
    a = (small / "images.txt").read_text().splitlines()
    b = (big / "images.txt").read_text().splitlines()
    assert b[:2] == a[:2] and b[5:] == a[2:]  # the extra train lines follow the first ones
    assert [ln.split()[0] for ln in b[2:5]] == [f"images/train/train_{i:04d}.png" for i in (2, 3, 4)]
    for line in a:  # every image of the smaller dataset is unchanged
        rel = line.split()[0]
        np.testing.assert_array_equal(read_image(small / rel), read_image(big / rel))
    extra = [read_image(big / f"images/train/train_{i:04d}.png") for i in (2, 3, 4)]
    assert not any(np.array_equal(e, read_image(small / ln.split()[0])) for e in extra for ln in a)
    import json
    rec = json.loads((big / "miniworld.json").read_text())
    assert rec == {"kind": "course", "n_train": 5, "n_val": 1, "n_test": 2, "n_distractor": 1, "size": 64, "seed": 1}
    assert not mw.is_outdated_course_dataset(big)
    (big / "miniworld.json").unlink()  # as written before miniworld.json existed
    assert mw.is_outdated_course_dataset(big)


def test_setup_rewrites_an_older_mini_world_but_never_other_data(tmp_path, monkeypatch):
    from fgbg import course
    written = []
    monkeypatch.setattr(mw, "write_course_dataset", lambda base, seed=0: written.append((str(base), seed)))
    old = tmp_path / "old"  # a mini world of an earlier version: no miniworld.json
    old.mkdir()
    (old / "images.txt").write_text("images/train/train_0000.png 1\n")
    (old / "README.txt").write_text("fgbg mini world course dataset (python -m fgbg.miniworld course).\n")
    mine = tmp_path / "mine"  # someone's own dataset, make_mini_world left at its default
    mine.mkdir()
    (mine / "images.txt").write_text("images/a/b.jpg 1\n")
    custom = tmp_path / "custom"  # a mini world written on purpose with other arguments
    custom.mkdir()
    for f in ("images.txt", "README.txt"):
        (custom / f).write_text((old / f).read_text())
    (custom / "miniworld.json").write_text('{"kind": "course", "n_train": 16}')
    for base in (old, mine, custom):
        course.setup({"base_dir": str(base), "out_dir": str(tmp_path / "out"), "make_mini_world": True})
    with pytest.raises(course.ParameterError, match="does not exist"):  # a typo: no synthetic data there
        course.setup({"base_dir": str(tmp_path / "missing"), "out_dir": str(tmp_path / "out"),
                      "make_mini_world": True})
    assert written == [(str(old), 0)]


def test_corpus_is_sliceable_and_disjoint_from_course():
    imgs, scenes = mw.make_corpus(6, seed=0)
    tail, tail_scenes = mw.make_corpus(3, seed=0, start=3)
    np.testing.assert_array_equal(imgs[3:], tail)
    assert [s.to_json() for s in scenes[3:]] == [s.to_json() for s in tail_scenes]
    course_rng = np.random.default_rng([0, 1])
    course_scene = mw.random_scene(course_rng, ["bird"])
    assert all(s.seed != course_scene.seed for s in scenes)


def test_corpus_bird_share_changes_classes_only():
    def scenes(share, n=300):
        return [mw.corpus_scene(np.random.default_rng([0, 2, k]), 32, bird_share=share) for k in range(n)]
    half, none, every, sixth = scenes(0.5), scenes(0.0), scenes(1.0), scenes(1 / 6)
    # the same number of objects in every scene, whatever the share
    for other in (none, every, sixth):
        assert [len(s.objects) for s in other] == [len(s.objects) for s in half]
    assert all(o.cls != "bird" for s in none for o in s.objects)
    assert all(o.cls == "bird" for s in every for o in s.objects)
    objs = [o.cls for s in sixth for o in s.objects]
    share = objs.count("bird") / len(objs)
    assert abs(share - 1 / 6) < 0.05 and abs([o.cls for s in half for o in s.objects].count("bird") / len(objs) - 0.5) < 0.06
    # the default is the corpus as it always was: item k drawn from stream [seed, 2, k]
    default_imgs, default_scenes = mw.make_corpus(3, size=32, seed=0)
    assert [s.to_json() for s in default_scenes] == [s.to_json() for s in scenes(0.5, 3)]
    with pytest.raises(ValueError, match="bird_share"):
        mw.corpus_scene(np.random.default_rng(0), bird_share=1.5)
    for bad in ("1.5", "1/0", "half"):  # the command line refuses it before writing anything
        with pytest.raises(SystemExit):
            mw.main(["corpus", "/nonexistent/never-written", "-n", "1", "--bird-share", bad])


def test_corpus_records_what_it_is_made_from(tmp_path):
    out = mw.write_corpus(tmp_path / "c", 3, size=32, seed=4, bird_share=0.0)
    rec = json.loads((out / "corpus.json").read_text())
    assert rec == {"kind": "corpus", "n": 3, "size": 32, "seed": 4, "world": "v1", "bird_share": 0.0}
    mw.check_corpus(out, mw.corpus_record(3, 32, 4, "v1", 0.0))  # its own settings pass
    with pytest.raises(ValueError, match=r"seed: 4 then, 5 now; world: 'v1' then, 'v2' now"):
        mw.check_corpus(out, mw.corpus_record(3, 32, 5, "v2", 0.0))
    (out / "corpus.json").unlink()  # a corpus that does not say what it was made from
    with pytest.raises(ValueError, match="no corpus.json"):
        mw.check_corpus(out, mw.corpus_record(3, 32, 4, "v1", 0.0))
    _, scenes = mw.load_corpus(out)
    assert len(scenes) == 3 and all(o.cls != "bird" for s in scenes for o in s.objects)


def test_cub_like_dataset_loads_as_official_cub(tmp_path):
    from fgbg.data import load_dataset, read_image, read_mask
    from fgbg.miniworld import write_cub_like
    base = write_cub_like(tmp_path, n_train=2, n_test=3, h=30, w=40)
    test = load_dataset(base, "test")
    assert test.layout == "cub" and len(test) == 3 and len(load_dataset(base, "train")) == 2
    for it in test:
        img, gt = read_image(it.image_path), read_mask(it.gt_path)
        assert img.shape == (30, 40, 3) and gt.shape == (30, 40)
        assert it.gt_path.parent.parent == tmp_path / "segmentations"
        # one visible bird: at least 20 pixels, not the whole image
        assert 20 <= gt.sum() < gt.size
