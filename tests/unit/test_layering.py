"""The import layering of DESIGN.md: a module imports only from its own layer
or lower ones, lazy (function-level) imports included.

    config < data, loss, logging < parallel < models < checkpoint < train < perf, cli
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parents[2] / "megatron_dpo"
LAYERS = {
    "config": 0,
    "data": 1, "loss": 1, "logging": 1,
    "parallel": 2,
    "models": 3,
    "checkpoint": 4,
    "train": 5,
    "perf": 6, "cli": 6, "convert_cli": 6,
}


def _layer_of(module: str) -> str:
    """'megatron_dpo.models.build' -> 'models'; the package itself -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(text: str, package: str):
    """(line, imported module) of every import in ``text`` at any depth (lazy
    imports in functions too); ``package``: where relative imports start."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from megatron_dpo.x import y` where y is a module
                yield node.lineno, f"{module}.{alias.name}"


def _violations():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer_of(_module_name(path))
        if own not in LAYERS:
            continue
        module_name = _module_name(path)
        package = module_name if path.name == "__init__.py" else module_name.rsplit(".", 1)[0]
        for line, module in _imports(path.read_text(), package):
            if not module.startswith("megatron_dpo."):
                continue
            other = _layer_of(module)
            if other in LAYERS and LAYERS[other] > LAYERS[own]:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {module} ({other})")
    return found


def test_every_subpackage_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert names <= set(LAYERS), f"give these a layer in DESIGN.md and here: {sorted(names - set(LAYERS))}"


def test_no_module_imports_from_a_higher_layer():
    violations = _violations()
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


@pytest.mark.parametrize("source, expected", [
    ("from megatron_dpo.train.loop import train\n", "megatron_dpo.train.loop"),
    ("def f():\n    from megatron_dpo.checkpoint import dist\n", "megatron_dpo.checkpoint.dist"),
    ("from ..train import loop\n", "megatron_dpo.train.loop"),
])
def test_the_parser_sees_lazy_relative_and_module_imports(source, expected):
    assert expected in [module for _, module in _imports(source, "megatron_dpo.config")]
