"""The layers of ``lib_ostaf`` (docs/architecture.md) and the one direction their imports
may take: hosts → webui → method → files → errors; world sits beside hosts; nothing
imports the command line. Read from the source (``ast``), so a lazy import inside a
function counts as much as one at the top."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import lib_ostaf

ROOT = Path(lib_ostaf.__file__).parent

# layer -> the layers (of lib_ostaf) its modules may import; every layer may read the
# package's ``__version__`` (``lib_ostaf/__init__.py``, which imports nothing)
ALLOWED = {
    layer: allowed | {"version"}
    for layer, allowed in {
        "errors": set(),
        "files": {"errors", "files"},
        "method": {"errors", "files", "method"},
        "world": {"errors", "files", "method", "world"},
        "webui": {"errors", "files", "method", "webui"},
        "hosts": {"errors", "files", "method", "webui", "world", "hosts"},
        # the standalone entry points sit on top
        "cli": {"errors", "files", "method", "webui", "world", "hosts", "cli"},
        "version": set(),
    }.items()
}
TOP = {"errors": "errors", "cli": "cli", "batch": "cli", "__main__": "cli", "__init__": "version"}


def layer_of(module: str) -> str:
    """``lib_ostaf.method.train`` → ``method``; the top-level modules by name."""
    parts = module.split(".")[1:]
    if not parts:
        return "version"  # ``from lib_ostaf import __version__``
    if len(parts) == 1 and parts[0] in TOP:
        return TOP[parts[0]]
    return parts[0]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every ``lib_ostaf`` module ``path`` imports, with its line (relative imports made
    absolute; ``from lib_ostaf.x import y`` counts ``lib_ostaf.x.y`` when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("lib_ostaf")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if not base.startswith("lib_ostaf"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or (
                    ROOT.parent / sub.replace(".", "/") / "__init__.py"
                ).is_file()
                found.append((node.lineno, sub if is_module else base))
    return found


def sources() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    layers = {layer_of(module_name(p)) for p in sources()}
    assert layers <= set(ALLOWED), layers - set(ALLOWED)


def test_imports_go_one_way():
    wrong = []
    for path in sources():
        mine = layer_of(module_name(path))
        for line, target in imports(path):
            if layer_of(target) not in ALLOWED[mine]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} ({mine}) imports {target}")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_command_line():
    wrong = [
        f"{path.relative_to(ROOT.parent)}:{line}"
        for path in sources()
        if path.name != "__main__.py"
        for line, target in imports(path)
        if target == "lib_ostaf.cli"
    ]
    assert not wrong, wrong


def test_the_check_sees_a_wrong_import(tmp_path, monkeypatch):
    """The test itself: a method module importing the WebUI layer is caught."""
    fake = tmp_path / "lib_ostaf" / "method"
    fake.mkdir(parents=True)
    bad = fake / "bad.py"
    bad.write_text("def f():\n    from lib_ostaf.webui import jobs\n    from ..cli import main\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "lib_ostaf")
    targets = [t for _, t in imports(bad)]
    assert targets == ["lib_ostaf.webui", "lib_ostaf.cli"]
    assert {layer_of(t) for t in targets} - ALLOWED["method"] == {"webui", "cli"}


def test_each_package_says_what_lives_there_and_what_it_may_import():
    for package in ("files", "method", "webui", "hosts", "world"):
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and "imports" in doc.lower(), package
        allowed = ALLOWED[package] - {"version", package}
        assert all(f"``lib_ostaf.{layer}``" in doc or f"``{layer}``" in doc for layer in allowed), (
            package,
            allowed,
        )


MAX_FUNCTION_LINES = 60
# declarative gradio layout: one component per few lines, no logic to split
LAYOUT = {("scripts/ostaf.py", "_attribute_tab"), ("scripts/ostaf.py", "_object_tab")}


def test_no_function_is_longer_than_60_lines():
    files = [*ROOT.rglob("*.py"), ROOT.parent / "scripts" / "ostaf.py"]
    long = []
    for path in files:
        rel = str(path.relative_to(ROOT.parent))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (rel, node.name) not in LAYOUT:
                    long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
