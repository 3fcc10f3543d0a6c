"""tools/check_imports.py: the package has no import cycle, and the checker finds one hidden
in a lazy import, under ``TYPE_CHECKING`` or behind a package ``__init__.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from tool_modules import load_tool

ROOT = Path(__file__).resolve().parents[1]


check_imports = load_tool("check_imports")


def write_package(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (paths relative to ``root``) and return the package folder ``root/pkg``."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_lightning_prune_has_no_import_cycle(capsys) -> None:
    assert check_imports.find_cycles(ROOT / "lightning_prune") == []
    assert check_imports.main([]) == 0
    assert "no import cycles among" in capsys.readouterr().out


CYCLES = {
    "lazy relative import": (
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import helper\n",
            "pkg/b.py": "def helper():\n    from . import a\n    return a\n",
        },
        ["pkg.a", "pkg.b"],
    ),
    "TYPE_CHECKING import": (
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "import pkg.b\n",
            "pkg/b.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n"
            ),
        },
        ["pkg.a", "pkg.b"],
    ),
    "package __init__ re-export": (
        {
            "pkg/__init__.py": "",
            "pkg/sub/__init__.py": "from pkg.sub.x import X\n",
            "pkg/sub/x.py": "class X:\n    def f(self):\n        from pkg.user import U\n",
            "pkg/sub/y.py": "Y = 1\n",
            "pkg/user.py": "from pkg.sub.y import Y\nU = Y\n",  # runs pkg/sub/__init__.py
        },
        ["pkg.sub", "pkg.sub.x", "pkg.user"],
    ),
    "self import": ({"pkg/__init__.py": "", "pkg/a.py": "def f():\n    import pkg.a\n"}, ["pkg.a"]),
}


@pytest.mark.parametrize("case", list(CYCLES))
def test_a_cycle_is_found_and_named(case: str, tmp_path: Path, capsys) -> None:
    files, members = CYCLES[case]
    package = write_package(tmp_path, files)
    assert [component for component, _ in check_imports.find_cycles(package)] == [members]
    assert check_imports.main([str(package)]) == 1
    out = capsys.readouterr().out
    assert f"import cycle 1: {', '.join(members)}" in out


def test_a_package_importing_its_own_modules_is_no_cycle(tmp_path: Path) -> None:
    """Submodules run their package's ``__init__.py`` first, but it has already started by
    then: an ``__init__.py`` re-exporting its modules, which import each other, is no cycle."""
    package = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import A\nfrom .b import B\n",
            "pkg/a.py": "from pkg.b import B\nA = B\n",
            "pkg/b.py": "from pkg import c\nB = c\n",
            "pkg/c.py": "import os\n",
        },
    )
    assert check_imports.find_cycles(package) == []
