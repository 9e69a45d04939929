"""The repository's shape, checked from the source text (no torch): imports run one way, at module
level; device-specific code lives in xla_utils.py only."""

import ast
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module -> the project modules it may import (the sample's path: shard bytes -> data -> model ->
# eval -> train; config.py turns presets into stages and the command line)
ALLOWED = {
    "cli": set(),
    "storage": set(),
    "trackers": set(),
    "checkpoints": {"storage"},
    "tokenizer": set(),
    "transforms": set(),
    "xla_utils": {"cli"},
    "shards": {"xla_utils", "checkpoints", "storage", "transforms"},
    "losses": {"xla_utils"},
    "data": {"cli", "xla_utils", "shards", "storage", "transforms", "tokenizer"},
    "model": {"cli", "xla_utils"},
    "factory": {"cli", "checkpoints", "model", "tokenizer", "transforms"},
    "eval_zeroshot": {"cli", "xla_utils", "checkpoints", "data", "storage", "transforms", "model", "factory"},
    "export": {"cli", "checkpoints", "model", "factory", "tokenizer"},
    "plan": {"xla_utils", "data", "transforms", "model"},
    "config": {"cli", "xla_utils", "shards", "losses", "model", "tokenizer", "trackers"},
    "train": {
        "cli",
        "xla_utils",
        "checkpoints",
        "config",
        "data",
        "transforms",
        "model",
        "factory",
        "eval_zeroshot",
        "losses",
        "plan",
        "shards",
        "storage",
        "trackers",
    },
    "finetune": {"train"},
}
CORE = list(ALLOWED)
# module -> project modules it must never import, whatever ALLOWED grows into (docs/models.md: the model
# reads tensors, not shards or captions; the platform layer and the leaves stand alone)
BANNED = {
    "model": {"data", "tokenizer"},
    "xla_utils": set(CORE) - {"cli"},
    "transforms": set(CORE),
    "cli": set(CORE),
    "storage": set(CORE) - {"cli"},
    "checkpoints": set(CORE) - {"storage"},
    "tokenizer": set(CORE),
    "trackers": set(CORE),
}
LAUNCH_MODULES = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "launch", "*.py"))}


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


def test_every_module_has_its_place_in_the_graph():
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "*.py"))}
    assert modules == set(ALLOWED)


@pytest.mark.parametrize("module", CORE)
def test_core_imports_run_one_way_at_module_level(module):
    top, nested = _project_imports(_tree(os.path.join(REPO, module + ".py")), set(CORE))
    assert not nested, f"{module}.py imports project modules inside functions: {nested}"
    assert top <= ALLOWED[module], (
        f"{module}.py imports {sorted(top - ALLOWED[module])} (allowed: {sorted(ALLOWED[module])})"
    )


@pytest.mark.parametrize("module", list(BANNED))
def test_boundaries_that_hold_whatever_the_graph_becomes(module):
    top, _ = _project_imports(_tree(os.path.join(REPO, module + ".py")), set(CORE))
    assert not top & BANNED[module], f"{module}.py imports {sorted(top & BANNED[module])}"
    assert not ALLOWED[module] & BANNED[module], f"ALLOWED lets {module}.py import {ALLOWED[module] & BANNED[module]}"


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


DEVICE_NAMES = {"cpu", "cuda", "gpu", "mps", "tpu", "xla"}


def _names_a_device(node) -> bool:
    return any(isinstance(n, ast.Constant) and n.value in DEVICE_NAMES for n in ast.walk(node))


def _is_kind(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "kind"


def _device_branches(tree: ast.Module) -> list[str]:
    """Lines that import torch_xla, touch torch.cuda, compare a tensor's .device.type, or branch on a
    runtime's .kind against a device name (a loss's .kind == "softmax" is no device branch)."""
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
            sides = [node.left, *node.comparators]
            for side in sides:
                if (
                    isinstance(side, ast.Attribute)
                    and side.attr == "type"
                    and isinstance(side.value, ast.Attribute)
                    and side.value.attr == "device"
                ):
                    found.append(f"{line}: compares .device.type")
                if _is_kind(side) and any(_names_a_device(other) for other in sides if other is not side):
                    found.append(f"{line}: compares .kind with a device")
        if isinstance(node, ast.Subscript) and _is_kind(node.slice) and _names_a_device(node.value):
            found.append(f"{line}: indexes a table of devices by .kind")
    return found


@pytest.mark.parametrize("module", [m for m in CORE if m != "xla_utils"])
def test_device_specific_code_only_in_xla_utils(module):
    found = _device_branches(_tree(os.path.join(REPO, module + ".py")))
    assert not found, f"{module}.py branches on the device (belongs in xla_utils.py): {found}"


def test_the_device_scan_finds_what_it_bans():
    banned = [
        "import torch_xla",
        "x = torch.cuda.is_available()",
        "if t.device.type == 'xla': pass",
        "if rt.kind == 'cuda': pass",
        "if rt.kind in ('cpu', 'xla'): pass",
        "kw = {'cpu': 1}[rt.kind]",
    ]
    for code in banned:
        assert _device_branches(ast.parse(code)), code
    assert not _device_branches(ast.parse("if self.kind == 'softmax': pass\nfn = LOSSES[self.kind]"))
