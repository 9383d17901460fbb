# Colab: fetch the course and make it importable, without restarting the runtime.
# Everywhere else (JupyterLab, papermill, nbval) this cell does nothing.
import os
import sys

if "google.colab" in sys.modules or os.environ.get("FGBG_COLAB_ROOT"):  # the variable: tests only
    import subprocess
    repo = os.path.join(os.environ.get("FGBG_COLAB_ROOT", "/content"), "fgbg")
    if not os.path.exists(os.path.join(repo, "pyproject.toml")):
        subprocess.run(["git", "clone", "-q", "--depth", "1", os.environ.get("FGBG_REPOSITORY", "{repository}"),
                        repo], check=True)
    if not os.environ.get("FGBG_COLAB_NO_INSTALL"):  # tests: the dependencies are there already
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{repo}[lowmem]"], check=True)
    os.chdir(repo)  # from /content, `import fgbg` would find the clone itself as a namespace package
    sys.path.insert(0, repo)
    for name in [m for m in sys.modules if m == "fgbg" or m.startswith("fgbg.")]:
        del sys.modules[name]
    from fgbg.models import describe_device
    print(describe_device())
