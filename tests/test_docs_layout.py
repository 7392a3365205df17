"""docs/architecture.md's module table and README's layout table describe the tree as it is: every module of
the package is listed, and every module listed exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("data", "geocells", "classifiers", "retrieval", "swc", "eval")


def package_modules():
    roots = [(ROOT / "geoswc", "geoswc")] + [(ROOT / name, f"geoswc.{name}") for name in COMPONENTS]
    names = set()
    for folder, package in roots:
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] in ("__init__", "__main__") or parts[0] == "commands":
                continue
            names.add(".".join([package, *parts]))
    return names


def test_every_module_is_in_the_architecture_table_and_nothing_else():
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(geoswc\.[\w.]+)` \|", table, flags=re.M))
    modules = package_modules()
    assert sorted(modules - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - modules) == [], "docs/architecture.md lists modules that do not exist"


def test_the_readme_layout_names_every_subpackage_of_the_front_door():
    text = (ROOT / "README.md").read_text()
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    subpackages = {p.parent.name for p in (ROOT / "geoswc").glob("*/__init__.py")}
    for name in sorted(subpackages):
        assert f"geoswc/{name}/" in layout, f"README's layout table does not name geoswc/{name}/"
