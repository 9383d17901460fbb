import pytest

from fgbg import params
from fgbg.course import main as course_main


def test_defaults_pass_and_fill_in():
    p = params.check({"limit": 3})
    assert p["limit"] == 3 and p["rev_diff_steps"] == 40 and p["model"] == "teaching"


@pytest.mark.parametrize("bad, match", [
    ({"rev_diff_step": 40}, r"unknown parameter 'rev_diff_step' \(did you mean 'rev_diff_steps'\?\)"),
    ({"rev_diff_steps": "40"}, r"'rev_diff_steps' must be int, got str"),
    ({"rev_diff_steps": True}, r"'rev_diff_steps' must be int"),
    ({"limit": 2.5}, r"'limit' must be int or null"),
    ({"rev_diff_steps": 60}, r"must not exceed num_inference_steps"),
    ({"rev_diff_steps": 0}, r"'rev_diff_steps' must be >= 1"),
    ({"splits": ["training"]}, r"'splits' must be a non-empty list"),
    ({"extractor": "max"}, r"'extractor' must be one of"),
    ({"m_pre_upsampling": "bicubic"}, r"'m_pre_upsampling' must be one of"),
    ({"object_word": "cat"}, r"object_word 'cat' is not in foreground_prompt"),
])
def test_bad_parameters_name_the_parameter(bad, match):
    with pytest.raises(params.ParameterError, match=match):
        params.check(bad, source="x.yaml")


def test_notebook_parameters_relate_only_what_the_notebook_declares():
    # notebook 04 declares num_inference_steps (its sampler) but not step 1's rev_diff_steps
    p = params.from_namespace({"num_inference_steps": 10, "out_dir": "x"})
    assert p["num_inference_steps"] == 10
    with pytest.raises(params.ParameterError, match="must not exceed"):
        params.from_namespace({"num_inference_steps": 10, "rev_diff_steps": 40})
    with pytest.raises(params.ParameterError, match="must not exceed"):  # a params file: the defaults count
        params.check({"num_inference_steps": 10})


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("rev_diff_steps: 40\nseeed: 1\n")
    with pytest.raises(params.ParameterError, match=r"p.yaml: unknown parameter 'seeed'"):
        params.load_yaml(f)
    f.write_text("a: [1, 2\n")
    with pytest.raises(params.ParameterError, match="p.yaml: not valid YAML"):
        params.load_yaml(f)
    with pytest.raises(params.ParameterError, match="does not exist"):
        params.load_yaml(tmp_path / "nope.yaml")


def test_shipped_params_files_are_valid(capsys, monkeypatch, mini_dataset):
    for f in ("params/demo.yaml", "params/quick.yaml"):
        assert course_main(["check", f]) == 0
    # CUB's base_dir is where the user unpacks it; the hub id cannot be checked offline
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert course_main(["check", "params/cub_sd14.yaml", "-p", "base_dir", str(mini_dataset)]) == 0
    assert course_main(["check", "params/colab_t4.yaml", "-p", "base_dir", str(mini_dataset)]) == 0
    assert course_main(["check", "params/none.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name, bad", [  # the values, and a few more
    ("seg_iterations", -1), ("seg_iterations", 0), ("steps", -3), ("finetune_steps", -5), ("finetune_steps", 0), ("finetune_lr", -1),
    ("finetune_lr", float("nan")), ("dtype", "fp8"), ("device", "gpu"), ("device", "cuda:x"), ("limit", 0),
    ("seed", -1), ("fg_bg_guidance", 0), ("seg_lr", 0.0), ("seg_size", 60), ("resize_mode", "crop"),
    ("splits", ["train", "train"]), ("out_dir", " "), ("foreground_prompt", ""),
])
def test_values_outside_the_allowed_ones_are_refused(name, bad):
    with pytest.raises(params.ParameterError, match=rf"x.yaml: parameter '{name}' must be .*, got "):
        params.check({name: bad}, source="x.yaml")


def test_every_parameter_declares_its_allowed_values_in_the_schema():
    for name, p in params.SCHEMA.items():
        if p.types != (bool,):
            assert p.allowed is not None, f"{name}: no allowed range or set in SCHEMA"
        assert params.check({name: p.default})[name] == p.default  # the defaults are allowed
    assert params.SCHEMA["overwrite"].types == (bool,) and params.SCHEMA["overwrite"].default is False
    for name, good in [("device", "cuda:1"), ("device", "cuda"), ("device", "mps"), ("dtype", "bf16"),
                       ("finetune_steps", 1), ("steps", None), ("limit", None), ("limit", 1), ("seed", 2 ** 32 - 1),
                       ("finetune_lr", 1), ("splits", ["test"])]:
        assert params.check({name: good})[name] == good  # the edges of the ranges pass


def test_a_bad_value_from_the_command_line_is_reported_as_such(capsys):
    for cmd in (["check", "params/demo.yaml"], ["run", "-f", "params/demo.yaml", "--notebooks", "01_attention"]):
        assert course_main([*cmd, "-p", "rev_diff_steps", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: command line (-p rev_diff_steps): parameter 'rev_diff_steps' must be >= 1")
        assert "demo.yaml" not in err


def test_check_refuses_a_base_dir_that_does_not_exist(capsys, tmp_path, monkeypatch, mini_dataset):
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the CLI's folder
    (tmp_path / "p.yaml").write_text("base_dir: nope\nmake_mini_world: false\n")
    assert course_main(["check", "p.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: p.yaml: base_dir 'nope' does not exist") and err.count("\n") == 1
    assert str(tmp_path / "nope") in err
    # make_mini_world writes only the course's own folder: another missing folder is refused
    assert course_main(["check", "p.yaml", "-p", "make_mini_world", "true"]) == 2
    assert "command line" not in capsys.readouterr().err  # base_dir came from the file
    assert course_main(["check", "-p", "base_dir", str(tmp_path / "gone"), "-p", "make_mini_world", "false"]) == 2
    assert capsys.readouterr().err.startswith("error: command line (-p base_dir): base_dir")
    # ... the course's own folder may be missing (it is written on the first run), an existing one is fine
    assert course_main(["check", "-p", "base_dir", "data/miniworld", "-p", "make_mini_world", "true"]) == 0
    assert mini_dataset == tmp_path / "mini"
    assert course_main(["check", "p.yaml", "-p", "base_dir", "mini"]) == 0
    assert params.check({"base_dir": str(tmp_path / "nope")})  # the schema alone never looks at the disk


def test_demo_yaml_equals_the_notebook_defaults():
    """params/demo.yaml spells out the notebooks' parameters cells: they must agree."""
    import papermill as pm
    import yaml
    demo = yaml.safe_load(open("params/demo.yaml"))
    import glob
    notebooks = sorted(glob.glob("notebooks/*.ipynb"))
    from fgbg.course import NOTEBOOKS
    assert notebooks == [f"notebooks/{n}.ipynb" for n in NOTEBOOKS]
    for nb in notebooks:
        for name, p in pm.inspect_notebook(nb).items():
            assert name in params.SCHEMA, f"{nb}: parameter {name} not in fgbg.params.SCHEMA"
            assert yaml.safe_load(p["default"].replace("None", "null").replace("True", "true")
                                  .replace("False", "false")) == demo[name], (nb, name)


def test_quick_params_cut_the_run_and_say_what_they_cut():
    import yaml
    text = open("params/quick.yaml").read()
    quick, demo = yaml.safe_load(text), yaml.safe_load(open("params/demo.yaml"))
    assert quick["out_dir"] != demo["out_dir"]  # never mixes with a full run's outputs
    assert quick["make_mini_world"] and quick["limit"] <= 4
    for name in ("rev_diff_steps", "num_inference_steps", "finetune_steps", "seg_iterations"):
        assert quick[name] < demo[name], name
    for name, value in quick.items():
        if name not in ("out_dir",) and value != demo[name]:
            assert f"#   {name} " in text, f"params/quick.yaml: the comments do not say what {name} cuts"
