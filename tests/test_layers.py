"""The package's layers, read from the source: every import counts, at module level or inside a function.

A lazy import that only hides a cycle still shows up here, so the check is on the import graph itself, not
on the symptom (an import-time failure).
"""

import ast
from pathlib import Path

import lightning_defense

ROOT = Path(lightning_defense.__file__).parent

#: What each package may import from lightning_defense (besides itself). Packages above import those below.
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "diffusion": {"core"},
    "datamodules": {"core", "models", "diffusion"},
    "attacks": {"core", "models", "datamodules"},
    "callbacks": {"core", "models", "datamodules"},
    "certify": {"core", "models", "datamodules"},
    "evaluate": {"core", "models", "datamodules", "attacks", "callbacks"},
    "cli": {"core", "models", "datamodules", "diffusion", "attacks", "callbacks", "certify", "evaluate"},
}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "lightning_defense" and len(parts) > 1 else None


def imports(path: Path, name: str) -> set[str]:
    """Every lightning_defense module that module ``name`` (at ``path``) imports, wherever the import stands."""
    tree = ast.parse(path.read_text())
    relative_to = name
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = relative_to.split(".")[: -node.level]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return {m for m in found if m.startswith("lightning_defense")}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        source = path.relative_to(ROOT).parts[0]
        if source.endswith(".py"):
            continue  # the top-level __init__
        name = ".".join(["lightning_defense", *path.relative_to(ROOT).with_suffix("").parts])
        for module in imports(path, name):
            target = package_of(module)
            if target is not None and target != source:
                graph.setdefault(source, set()).add(target)
    return graph


def test_every_package_is_in_a_layer():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED), f"add new packages to ALLOWED: {sorted(packages ^ set(ALLOWED))}"


def test_packages_import_only_the_layers_below():
    graph = package_graph()
    wrong = {source: sorted(targets - ALLOWED[source]) for source, targets in graph.items() if targets - ALLOWED[source]}
    assert not wrong, f"imports against the layering (lazy ones included): {wrong}"


def test_no_import_cycle_between_packages():
    graph = package_graph()

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    cycles = sorted(p for p in graph if reaches(p, p, {p}))
    assert not cycles, f"packages on an import cycle: {cycles}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from lightning_defense.certify import loop\n    import lightning_defense.models\n"
                      "    from ..attacks import base\n")
    assert imports(module, "lightning_defense.callbacks.m") == {
        "lightning_defense.certify", "lightning_defense.models", "lightning_defense.attacks"}
