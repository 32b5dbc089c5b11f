"""Python documentation as text shards for language models: stdlib docstrings (read with ast) or Debian's python3-doc."""

from __future__ import annotations

import ast
import itertools
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from mmeff.data.sources import SOURCES

# Test suites, demos, GUI code, vendored or generated data (codec tables), jokes: not documentation.
SKIP = {
    *("test", "tests", "idle_test", "idlelib", "turtledemo", "tkinter", "lib2to3", "ensurepip", "pydoc_data"),
    *("encodings", "this", "antigravity"),
}
PYTHON3_DOC = "/usr/share/doc/python3*/html/_sources"
Corpus = Literal["docstrings", "python3-doc"]


def _module_files(stdlib: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, source file) of the standard library, in sorted order, without SKIP packages."""
    for top in sorted(sys.stdlib_module_names - SKIP):
        if (stdlib / f"{top}.py").is_file():
            yield top, stdlib / f"{top}.py"
        elif (stdlib / top / "__init__.py").is_file():
            for file in sorted((stdlib / top).rglob("*.py")):
                parts = file.relative_to(stdlib).with_suffix("").parts
                if not SKIP & set(parts):
                    yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), file


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}" + (f"({', '.join(ast.unparse(b) for b in node.bases)})" if node.bases else "")
    return f"def {node.name}({ast.unparse(node.args)})"


def module_docs(name: str, source: str) -> str:
    """The docstrings of a module's source: the module's, then each class's and function's under its signature."""
    tree = ast.parse(source)
    parts = [f"Module {name}\n\n{ast.get_docstring(tree)}"] if ast.get_docstring(tree) else []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(f"{prefix}{_signature(node)}\n\n{doc}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, f"{name}.")
    return "\n\n".join(parts)


def documents(corpus: Corpus = "docstrings", max_docs: int | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) per stdlib module with docstrings, or per python3-doc page; deterministic order."""
    found = _doc_pages(PYTHON3_DOC) if corpus == "python3-doc" else _docstrings(Path(sysconfig.get_paths()["stdlib"]))
    return itertools.islice(found, max_docs)


def _docstrings(stdlib: Path) -> Iterator[tuple[str, str]]:
    for name, file in _module_files(stdlib):
        try:
            with tokenize.open(file) as f:
                text = module_docs(name, f.read())
        except (SyntaxError, UnicodeDecodeError):  # e.g. deliberately broken files in some packages
            continue
        if text:
            yield name, text


def _doc_pages(pattern: str) -> Iterator[tuple[str, str]]:
    roots = sorted(Path("/").glob(pattern.lstrip("/")))
    pages = [(p.relative_to(root).as_posix(), p) for root in roots for p in sorted(root.rglob("*.txt"))]
    if not pages:
        raise FileNotFoundError(f"no python3-doc text files under {pattern} (apt-get install python3-doc)")
    for name, page in pages:
        yield name, page.read_text(encoding="utf-8")


@SOURCES.register("python-docs", summary=__doc__)
def build(
    out_dir: Path,
    seq_len: int = 256,
    tokenizer: str | None = None,
    corpus: Corpus = "docstrings",
    max_docs: int | None = None,
    val: float = 0.05,
    test: float = 0.05,
    maxcount: int = 1000,
) -> dict[str, int]:
    """Write the corpus as packed text shards (byte tokenizer, or the tokenizer folder/file `tokenizer`)."""
    from mmeff.data.text import write_text_shards
    from mmeff.encoders.text import load_tokenizer

    return write_text_shards(
        documents(corpus, max_docs),
        out_dir,
        load_tokenizer(tokenizer) if tokenizer else None,
        seq_len=seq_len,
        val=val,
        test=test,
        maxcount=maxcount,
    )
