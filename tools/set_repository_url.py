"""Change the repository's URL everywhere it is written.

Its one home is pyproject.toml ([project.urls] Repository); copies of it are written
literally in the README's badge, the lessons' "Open in Colab" badges and Colab set-up
cells (notebooks/py/*.py, their notebooks, the rendered lessons in docs/lessons/).
tests/test_colab.py checks that they all agree with pyproject.toml.

    python tools/set_repository_url.py https://github.com/OWNER/NAME
"""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def slug(url: str) -> str:
    if not url.startswith("https://github.com/"):
        raise SystemExit(f"expected https://github.com/OWNER/NAME, got {url!r}")
    return url.removeprefix("https://github.com/").removesuffix(".git").strip("/")


def main() -> int:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    old = slug(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"])
    new = slug(sys.argv[1])
    files = [ROOT / "pyproject.toml", ROOT / "README.md", *sorted((ROOT / "notebooks").glob("**/*.py")),
             *sorted((ROOT / "notebooks").glob("**/*.ipynb")), *sorted((ROOT / "docs" / "lessons").glob("*.ipynb"))]
    for f in files:
        text = f.read_text()
        if f"github.com/{old}" in text:
            f.write_text(text.replace(f"github.com/{old}", f"github.com/{new}"))
            print("updated", f.relative_to(ROOT))
    subprocess.run([sys.executable, str(ROOT / "tools" / "notebooks.py"), "sync"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
