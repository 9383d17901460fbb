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


def test_shipped_params_files_are_valid(capsys):
    for f in ("params/demo.yaml", "params/cub_sd14.yaml"):
        assert course_main(["check", f]) == 0
    assert course_main(["check", "params/none.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_yaml_equals_the_notebook_defaults():
    """params/demo.yaml spells out the notebooks' parameters cells: they must agree."""
    import papermill as pm
    import yaml
    demo = yaml.safe_load(open("params/demo.yaml"))
    import glob
    notebooks = sorted(glob.glob("notebooks/*.ipynb"))
    assert len(notebooks) == 5
    for nb in notebooks:
        for name, p in pm.inspect_notebook(nb).items():
            assert name in params.SCHEMA, f"{nb}: parameter {name} not in fgbg.params.SCHEMA"
            assert yaml.safe_load(p["default"].replace("None", "null").replace("True", "true")
                                  .replace("False", "false")) == demo[name], (nb, name)
