"""The shape of the package (docs/architecture.md), checked from the source text of kdtool/.

Built from the `import` statements themselves (top-level and inside functions, but not those under
`if TYPE_CHECKING:`), so a cycle fails here before it fails someone at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdtool"
#: Where typer/rich may be imported: the CLI layer only (library code returns data, the CLI renders it).
CLI = "kdtool.cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path) -> set[str]:
    """Every module name imported by `path` (absolute and relative, at any depth)."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.add(sub if sub in MODULES else base)
            visit(child)

    visit(tree)
    return out


GRAPH = {name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.endswith("__init__") or nxt == "kdtool":
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_find_cycle_sees_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_is_read_from_real_imports():
    # a known edge of each kind: top-level import and a lazy import inside a command body
    assert "kdtool.errors" in GRAPH["kdtool.formats"]
    assert any(m.startswith("kdtool.") and m != "kdtool.cli.common" for m in GRAPH["kdtool.cli.predict"])


def test_no_import_cycles_inside_kdtool():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_package_init_files_are_empty():
    """Stage packages are folders of modules; nothing is re-exported from an __init__.py."""
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "kdtool":
            assert path.read_text().strip() == "", f"{path} is not empty"


def test_library_code_does_not_import_the_cli_toolkit():
    """typer and rich belong to kdtool.cli; library modules return data and raise kdtool.errors."""
    for name, path in MODULES.items():
        if name == CLI or name.startswith(CLI + ".") or name == "kdtool.__main__":  # __main__ starts the CLI
            continue
        used = {m.split(".")[0] for m in imports(path)}
        assert not used & {"typer", "rich", "click"}, f"{path} imports {sorted(used & {'typer', 'rich', 'click'})}"
        assert "kdtool.cli" not in {".".join(m.split(".")[:2]) for m in imports(path)}, f"{path} imports kdtool.cli"


def test_every_kdtool_import_in_the_scripts_resolves():
    """Scripts carry Python in heredocs that no linter sees: the layout move left scripts/fetch-corpus importing
    `kdtool.corpus`, so on a fresh machine the demo silently fell back to the stdlib docs for its corpus."""
    import importlib
    import re

    pattern = re.compile(r"^\s*(?:from (kdtool[\w.]*) import ([\w, ]+(?: as \w+)?)|import (kdtool[\w.]*))\s*$")
    scripts = [p for p in (PACKAGE.parent / "scripts").rglob("*") if p.is_file() and p.suffix in ("", ".sh", ".py")]
    seen = 0
    for path in scripts:
        for line in path.read_text(errors="replace").splitlines():
            m = pattern.match(line)
            if not m:
                continue
            seen += 1
            module = importlib.import_module(m.group(1) or m.group(3))
            for name in (m.group(2) or "").split(","):
                name = name.split(" as ")[0].strip()
                if name and not hasattr(module, name):
                    importlib.import_module(f"{module.__name__}.{name}")  # a submodule, or this raises
    assert seen > 10  # the scan found the scripts' imports
