"""The repository's shape, checked from the source text (no torch): imports run one way, at module
level; device-specific code lives in xla_utils.py only; core files stay readable in one sitting."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module -> the project modules it may import (the sample's path: shard bytes -> data -> model ->
# eval -> train)
ALLOWED = {
    "xla_utils": set(),
    "checkpoints": set(),
    "tokenizer": set(),
    "shards": {"xla_utils", "checkpoints"},
    "losses": {"xla_utils"},
    "data": {"xla_utils", "shards"},
    "model": {"xla_utils", "checkpoints", "data", "tokenizer"},
    "eval_zeroshot": {"xla_utils", "checkpoints", "data", "model", "tokenizer"},
    "export": {"xla_utils", "checkpoints", "data", "model", "tokenizer"},
    "plan": {"xla_utils", "data", "tokenizer", "model"},
    "train": {"xla_utils", "checkpoints", "shards", "data", "model", "tokenizer", "eval_zeroshot", "losses", "plan"},
    "finetune": {"train"},
}
CORE = list(ALLOWED)
LAUNCH_MODULES = {"demo_data", "bench_data", "bench_tokenizer", "bench_step"}  # importable from launch/ scripts
MAX_LINES = 900


def _tree(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _imported(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module.split(".")[0]]
    return []


def _launch_scripts() -> list[str]:
    d = os.path.join(REPO, "launch")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".py"))


def _project_imports(tree: ast.Module, project: set[str]):
    """(module-level project imports, [(line, name)] of project imports anywhere else)."""
    top = {n for node in tree.body for n in _imported(node) if n in project}
    top_nodes = set(map(id, tree.body))
    nested = [
        (node.lineno, n)
        for node in ast.walk(tree)
        if id(node) not in top_nodes
        for n in _imported(node)
        if n in project
    ]
    return top, nested


@pytest.mark.parametrize("module", CORE)
def test_core_imports_run_one_way_at_module_level(module):
    top, nested = _project_imports(_tree(os.path.join(REPO, module + ".py")), set(CORE))
    assert not nested, f"{module}.py imports project modules inside functions: {nested}"
    assert top <= ALLOWED[module], (
        f"{module}.py imports {sorted(top - ALLOWED[module])} (allowed: {sorted(ALLOWED[module])})"
    )


def test_allowed_graph_has_no_cycle():
    seen, done = set(), set()

    def visit(m, path):
        assert m not in seen - done, f"cycle: {' -> '.join(path + [m])}"
        if m in done:
            return
        seen.add(m)
        for dep in ALLOWED[m]:
            visit(dep, path + [m])
        done.add(m)

    for m in CORE:
        visit(m, [])


@pytest.mark.parametrize("path", _launch_scripts(), ids=os.path.basename)
def test_launch_scripts_import_at_module_level(path):
    _, nested = _project_imports(_tree(path), set(CORE) | LAUNCH_MODULES)
    assert not nested, f"{os.path.relpath(path, REPO)} imports project modules inside functions: {nested}"


def _device_branches(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if any(n == "torch_xla" for n in _imported(node)):
            found.append(f"{line}: imports torch_xla")
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "cuda"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            found.append(f"{line}: torch.cuda")
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                if (
                    isinstance(side, ast.Attribute)
                    and side.attr == "type"
                    and isinstance(side.value, ast.Attribute)
                    and side.value.attr == "device"
                ):
                    found.append(f"{line}: compares .device.type")
                if isinstance(side, ast.Attribute) and side.attr == "kind":
                    found.append(f"{line}: compares .kind")
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Attribute) and node.slice.attr == "kind":
            found.append(f"{line}: indexes by .kind")
    return found


@pytest.mark.parametrize("module", [m for m in CORE if m != "xla_utils"])
def test_device_specific_code_only_in_xla_utils(module):
    found = _device_branches(_tree(os.path.join(REPO, module + ".py")))
    assert not found, f"{module}.py branches on the device (belongs in xla_utils.py): {found}"


def test_the_device_scan_finds_what_it_bans():
    code = (
        "import torch_xla\nx = torch.cuda.is_available()\nif t.device.type == 'xla': pass\n"
        "if rt.kind == 'cuda': pass\nkw = {'cpu': 1}[rt.kind]\n"
    )
    assert len(_device_branches(ast.parse(code))) == 5


@pytest.mark.parametrize("module", CORE)
def test_core_files_read_in_one_sitting(module):
    with open(os.path.join(REPO, module + ".py"), encoding="utf-8") as f:
        n = sum(1 for _ in f)
    assert n <= MAX_LINES, f"{module}.py has {n} lines (limit {MAX_LINES}): split by responsibility"
