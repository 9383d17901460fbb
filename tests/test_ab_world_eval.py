"""benchmarks/ab_world_eval.py's cue-swap scoring, on the tiny random pipeline."""
import importlib.util
import json

import pytest


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("ab_world_eval", "benchmarks/ab_world_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cue_swap_scores_the_typical_pictures_once_and_what_training_added(ab, pipe, tmp_path):
    """Every swap shares one folder of typical pictures, whose maps are made once per network;
    "training added" is the per-picture difference of the model's and the untrained
    network's swapped-minus-typical."""
    from fgbg import params
    P = {**params.defaults(), "num_inference_steps": 10, "rev_diff_steps": 4}
    data, out = tmp_path / "data", tmp_path / "out"
    size = ab.score_cue_swap(data, out, pipe, P, n=3, swap=("size",))
    typical = sorted((out / "cue_swap" / "typical").rglob("*.npz"))
    assert typical and not (out / "cue_swap-size" / "typical").exists()
    assert json.loads((data / "cue_swap-size" / "swapped" / "miniworld.json").read_text())["swap"] == ["size"]
    stamps = {f: f.stat().st_mtime_ns for f in typical}
    full = ab.score_cue_swap(data, out, pipe, P, n=3)
    assert {f: f.stat().st_mtime_ns for f in sorted((out / "cue_swap" / "typical").rglob("*.npz"))} == stamps
    assert full["typical"] == size["typical"] and full["untrained"]["typical"] == size["untrained"]["typical"]
    for r in (size, full):
        model, untrained = r["swapped_minus_typical"], r["untrained"]["swapped_minus_typical"]
        added = r["training_added"]
        assert added["swapped_minus_typical"]["n"] == model["n"] == untrained["n"] > 0
        assert added["swapped_minus_typical"]["mean"] == pytest.approx(model["mean"] - untrained["mean"], abs=2e-4)
        for k in ("typical", "swapped"):  # all pictures scored by both: the mean of differences is the difference of means
            assert added[k]["n"] == r[k]["n"] == r["untrained"][k]["n"]
            assert added[k]["mean"] == pytest.approx(r[k]["bird_vs_fish_auc"] - r["untrained"][k]["bird_vs_fish_auc"],
                                                     abs=2e-4)
    assert ab.paired_mean([0.1, -0.3]) == {"n": 2, "mean": -0.1, "se": 0.2, "n_lower": 1}
