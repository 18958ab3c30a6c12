"""Imports run only down the pipeline (DESIGN.md): quantization -> llm_loader -> builder -> runtime, each stage may use
`plugins` and `contract`; `plugins` imports no stage; `contract` imports no other project package. The builder and
the runtime read the directories before them only through `contract` (its readers of every contract file), so they
import no earlier stage at all, and the runtime no part of the builder. Every import statement counts, at module level
or inside a function, read from the source with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

ALLOWED = {
    "quantization": {"quantization", "plugins", "contract"},
    "llm_loader": {"quantization", "llm_loader", "plugins", "contract"},
    "builder": {"builder", "plugins", "contract"},
    "runtime": {"runtime", "plugins", "contract"},
    "plugins": {"plugins", "contract"},
    "contract": {"contract"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in `path`; relative imports stay in their package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, package
    bad = [f"{path.relative_to(REPO)}:{line} imports {imported}"
           for path in files for line, imported in imported_packages(path)
           if imported in ALLOWED and imported not in ALLOWED[package]]
    assert bad == [], f"{package} may import {sorted(ALLOWED[package])} of the project's packages"


def test_the_scan_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from runtime.engine import Engine\n    from . import x\n")
    assert imported_packages(source) == [(1, "os"), (4, "runtime")]
