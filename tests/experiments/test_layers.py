"""The experiments' import direction: studies -> common -> problems, no study -> study."""

import ast
from pathlib import Path

import experiments

ROOT = Path(experiments.__file__).parent
LAYERS = ("common", "problems")


def _owner(module: str) -> str | None:
    """The experiments package a dotted module belongs to (``None`` if outside)."""
    parts = module.split(".")
    if parts[0] != "experiments" or len(parts) < 2:
        return None
    if parts[1] == "benchmarks" and len(parts) > 2:
        return f"benchmarks.{parts[2]}"
    return parts[1]


def _imports() -> set[tuple[str, str]]:
    """Every ``(importing package, imported package)`` pair under experiments/."""
    pairs = set()
    for path in ROOT.rglob("*.py"):
        module = ".".join(
            ("experiments", *path.relative_to(ROOT).with_suffix("").parts)
        )
        source = _owner(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                target = _owner(name)
                if source and target and target != source and target != "__init__":
                    pairs.add((source, target))
    return pairs


def test_studies_import_only_common_and_problems():
    around = {
        (source, target)
        for source, target in _imports()
        if source not in LAYERS and target not in LAYERS
    }
    assert not around, f"studies importing other studies: {around}"


def test_common_builds_on_problems_only():
    pairs = _imports()
    common = {t for s, t in pairs if s == "common"}
    problems = {t for s, t in pairs if s == "problems"}
    assert common <= {"problems"}, f"common imports {common - {'problems'}}"
    assert not problems, f"problems imports {problems}"
