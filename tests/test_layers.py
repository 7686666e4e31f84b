"""The import layers of the installed `nemotune` package: every import points down or sideways, never up,
and no two packages import each other.

    0  nemotune.converters.formats   files: HF configs and shards, dist checkpoints, .nemo, adapter dirs
    1  nemotune.data_prep            prepared data;   nemotune.launchers: torchrun / Slurm rendering
    2  nemotune.recipes.engine       model builder, LoRA, distributed, trainer, checkpointing, config
    3  nemotune.converters           the conversion / export / verify verbs
    4  nemotune.recipes              the stories (train, two-stage, evaluate, launch, demo) and the CLI
Imports inside functions count too: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {  # package -> (folder, layer)
    "nemotune.converters.formats": ("converters/formats", 0),
    "nemotune.data_prep": ("data_prep", 1),
    "nemotune.launchers": ("launchers", 1),
    "nemotune.recipes.engine": ("recipes/engine", 2),
    "nemotune.converters": ("converters", 3),
    "nemotune.recipes": ("recipes", 4),
}
TOP_LEVEL_NAMES = ("recipes", "converters", "data_prep", "launchers", "conf")


def package_of(module: str) -> str | None:
    """The most specific package in PACKAGES that holds `module` (nemotune.conf holds YAML only)."""
    matches = [p for p in PACKAGES if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def module_name(path: Path) -> str:
    for package, (folder, _) in sorted(PACKAGES.items(), key=lambda item: -len(item[1][0])):
        if path.is_relative_to(REPO / folder):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [] if rel.name == "__init__" else list(rel.parts)
            if rel.name == "__init__":
                parts = list(rel.parent.parts)
            return ".".join([package, *parts])
    raise AssertionError(path)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; use the full nemotune.* name")
    return found


def source_files() -> list[Path]:
    roots = {REPO / folder for folder, _ in PACKAGES.values()}
    return sorted({p for root in roots for p in root.rglob("*.py") if "assets" not in p.parts})


def dependencies() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> ['file:line imports module', ...] across packages."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in source_files():
        here = package_of(module_name(path))
        for line, target in imports_of(path):
            there = package_of(target)
            if there and there != here:
                edges.setdefault((here, there), []).append(f"{path.relative_to(REPO)}:{line} imports {target}")
    return edges


def test_no_module_imports_a_top_level_name_outside_the_namespace():
    bad = [f"{p.relative_to(REPO)}:{line} imports {target}" for p in source_files()
           for line, target in imports_of(p) if target.split(".")[0] in TOP_LEVEL_NAMES]
    assert not bad, "import through the nemotune namespace:\n" + "\n".join(bad)


def test_every_import_points_down_or_sideways():
    upward = [site for (src, dst), sites in dependencies().items() if PACKAGES[dst][1] > PACKAGES[src][1]
              for site in sites]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_no_two_packages_import_each_other():
    edges = dependencies()
    cycles = [f"{a} <-> {b}: {edges[(a, b)][0]}; {edges[(b, a)][0]}" for (a, b) in edges if (b, a) in edges and a < b]
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_package_is_a_folder_with_an_init(package):
    assert (REPO / PACKAGES[package][0] / "__init__.py").is_file()
