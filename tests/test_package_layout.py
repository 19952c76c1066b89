"""The package's architecture rules, read from the source with `ast`: no import cycles (lazy imports inside functions
count) except the one documented in model.py, no module that loads a script, every module opens with a docstring,
and the folders are the ones the README's tour names."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "miniclip"
# MiniClip.from_pretrained / save_pretrained import checkpoints/ lazily, which builds MiniClip: the one allowed cycle.
ALLOWED_CYCLE_EDGES = {("miniclip.model", "miniclip.checkpoints.loading"), ("miniclip.model", "miniclip.checkpoints.saving")}
SUBPACKAGES = {"apps", "checkpoints", "data", "evaluation", "serving", "training"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every miniclip module that `name` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` imports the submodule; `from pkg import name` imports pkg
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                       for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{MODULES[name]}: relative import; the package uses absolute imports (from miniclip...)")
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_cycle_but_the_documented_one():
    graph = {name: imports_of(name) for name in MODULES}
    for a, b in ALLOWED_CYCLE_EDGES:
        assert b in graph[a], f"{a} no longer imports {b}: drop it from ALLOWED_CYCLE_EDGES"
        graph[a].discard(b)
    assert find_cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_loads_a_script():
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        assert "spec_from_file_location" not in text and "__import__(" not in text, path
        assert not {"train", "test"} & imports_of(name), path


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_opens_with_a_docstring(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text(encoding="utf-8")))
    if MODULES[name].name == "__init__.py" and name != "miniclip" and not MODULES[name].read_text().strip():
        return  # an empty package marker
    assert doc and len(doc.splitlines()) >= 2, f"{MODULES[name]}: open with 2-4 lines (what it is, what it leaves out)"


def test_folders_are_the_architecture():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == SUBPACKAGES
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    tour = readme[readme.index("## Tour"):]
    named = {line.split()[0].rstrip("/") for line in tour.splitlines() if line.startswith("  ") and line.split()}
    assert SUBPACKAGES <= named, f"the README's tour does not name {sorted(SUBPACKAGES - named)}"
    top = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert top <= {n.removesuffix(".py") for n in named}, f"the tour misses {sorted(top - named)}"
