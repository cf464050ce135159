"""The contracts package sits below both sides: kubetune_contract imports neither the operator
(kubetune) nor the trainer (kubetune_trainer), and neither of those imports the other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"kubetune_contract": REPO / "contract", "kubetune": REPO / "operator",
            "kubetune_trainer": REPO / "trainer_image"}
MAY_NOT_IMPORT = {
    "kubetune_contract": {"kubetune", "kubetune_trainer"},
    "kubetune": {"kubetune_trainer"},
    "kubetune_trainer": {"kubetune"},
}
# `kubetune estimate` on a workstation where the trainer is installed reads a private backbone's
# config.json with the caller's credentials through the trainer's downloader; without the trainer it
# reads anonymously, as the operator does. The operator's image never takes that path.
# `kubetune pull` downloads and checks a run with the trainer's own store and manifest code (the same
# checks as the trainer's `pull` for init containers), and `kubetune logs` reads a published log with
# it; both run on a workstation, never in the operator.
ALLOWED = {("kubetune/preflight.py", "kubetune_trainer"), ("kubetune/pull.py", "kubetune_trainer"),
           ("kubetune/follow.py", "kubetune_trainer")}


def imports(path: Path) -> set[str]:
    """The top-level packages a module imports (at any depth of the module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_package_imports_the_side_it_must_not(package: str) -> None:
    root = PACKAGES[package]
    crossing = [f"{path.relative_to(root)} imports {other}"
                for path in sorted((root / package).rglob("*.py"))
                for other in imports(path) & MAY_NOT_IMPORT[package]
                if (str(path.relative_to(root)), other) not in ALLOWED]
    assert crossing == []


def test_the_contracts_need_only_pydantic_and_the_standard_library() -> None:
    import sys

    third_party = {name for path in (REPO / "contract" / "kubetune_contract").rglob("*.py") for name in imports(path)
                   if name not in sys.stdlib_module_names and name not in {"kubetune_contract", "__future__"}}
    assert third_party <= {"pydantic", "yaml"}, third_party
