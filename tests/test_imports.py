"""The layers import downward only (ops -> blocks -> backbone -> encoders/tasks -> trainer -> CLI), checked on the
import statements of every mmeff module (function bodies included); and the command line starts without torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmeff"

# Layer rank of each top-level part of mmeff; a module may import its own rank or lower ones.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "registry", "config", "presets"),  # plain data: no torch
    ("ops", "kernels", "metrics"),
    ("blocks",),
    ("backbone", "lora"),
    ("encoders",),
    ("data", "generate", "diffusion_sampling", "hub"),  # shards, samplers and the Hub mixin use the tokenizers
    ("tasks", "hub"),  # hub: the base class of the task models (from_pretrained / save_pretrained)
    ("checkpoint", "convert", "export"),  # rebuilding a model needs the task registry
    ("trainer", "serve", "strategies"),
    ("commands", "cli", "__main__", "__init__"),  # the command line and the package facade (lazy attributes)
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
# Known exceptions, each with its reason: `import mmeff` reaches the whole package through its lazy attributes.
ALLOWED = {
    "mmeff.hub -> mmeff": "Model.from_pretrained rebuilds any task's model with mmeff.load, below the tasks that inherit it",
}


def module_name(path: Path) -> str:
    """Dotted name of a source file of mmeff."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """The mmeff modules that `path` imports anywhere in its body (`from a import b` counts `a.b` if it is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names}
    return {name for name in found if name == "mmeff" or name.startswith("mmeff.")}


def rank(module: str) -> int:
    """The layer of a dotted mmeff module name (the package root is the facade, on top)."""
    part = module.split(".")[1] if "." in module else "__init__"
    if part not in RANK:
        raise KeyError(f"{module}: add its top-level part {part!r} to a layer of tests/test_imports.py LAYERS")
    return RANK[part]


def upward_edges() -> list[str]:
    """Every import of a higher layer by a lower one, as 'importer (layer) -> imported (layer)'."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = module_name(path)
        for dst in sorted(imports(path)):
            if rank(dst) > rank(src) and f"{src} -> {dst}" not in ALLOWED:
                bad.append(f"{src} (layer {rank(src)}) -> {dst} (layer {rank(dst)})")
    return bad


def test_layers_import_downward_only():
    bad = upward_edges()
    assert not bad, "imports of higher layers:\n" + "\n".join(bad)


def cycles() -> list[list[str]]:
    """Import cycles between mmeff modules (each found once, as the path that closes it)."""
    graph = {module_name(p): {d for d in imports(p) if f"{module_name(p)} -> {d}" not in ALLOWED} for p in PACKAGE.rglob("*.py")}
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append(path[path.index(node) :] + [node])
            return
        if node in done or node not in graph:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])
    return found


def test_no_import_cycles():
    assert not cycles(), "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles())


def test_graph_check_finds_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "mmeff"
    (fake / "blocks").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "trainer.py").write_text("")
    (fake / "blocks" / "__init__.py").write_text("def f():\n    from mmeff import trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert upward_edges() == ["mmeff.blocks (layer 2) -> mmeff.trainer (layer 8)"]


def _seconds(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mmeff", *args], capture_output=True, text=True, timeout=120)
    return time.perf_counter() - start, proc


def test_config_error_answers_without_heavy_imports(tmp_path):
    config = PACKAGE.parent / "configs" / "vision" / "digits.yaml"
    seconds, proc = _seconds("fit", str(config), "--backbone.dimm=3")
    assert proc.returncode == 2 and "unknown key backbone.dimm" in proc.stderr, proc.stderr[-2000:]
    print(f"config error in {seconds:.2f}s")
    assert seconds < 6, f"mmeff fit CONFIG --backbone.dimm=3 took {seconds:.1f}s"


def _torch_imported(args: list[str], env: dict[str, str] | None = None) -> tuple[bool, str]:
    code = "import sys; from mmeff.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code % args], capture_output=True, text=True, timeout=120, env=env)
    *out, last = proc.stdout.strip().splitlines() or ["?"]
    assert last in ("True", "False"), proc.stdout[-2000:] + proc.stderr[-2000:]
    return last == "True", "\n".join(out)


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["shards", "--help"], ["models"]])
def test_help_imports_no_torch(args):
    torch, shown = _torch_imported(args)
    assert not torch and shown


def test_blocks_listing_is_kept_and_read_without_torch(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    torch_first, listing = _torch_imported(["blocks"], env)  # lists the registry, keeps the listing
    torch_again, again = _torch_imported(["blocks"], env)
    assert torch_first and not torch_again and again == listing and "gla " in listing
    (tmp_path / "mmeff").rename(tmp_path / "other")  # no kept listing (as after a block changed): lists afresh
    assert _torch_imported(["blocks"], env)[0]
