"""The code and docs corpora: the Python standard library installed on this machine.

Nothing is downloaded. `code` is one document per stdlib source file; `docs` is one
document per module (its docstrings, read with `ast` from the source: importing every
module to call `inspect` would run their import-time side effects) plus one per pydoc
topic. Files are visited in sorted path order so the corpus does not depend on the
filesystem. The content depends on the Python version, which the manifest records.
"""
from __future__ import annotations

import ast
import os
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STDLIB = Path(sysconfig.get_path("stdlib"))
# Test suites, the IDLE app and installed third-party packages are not "the library".
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "__pycache__", "site-packages", "dist-packages"})
# Codec tables (gencodec.py), Sphinx's pydoc topics dump and other machine-written files.
GENERATED = re.compile(r"gencodec\.py|[Aa]uto-?generated|DO NOT EDIT")
MAX_FILE_BYTES = 64 * 1024


@dataclass(frozen=True)
class SourceFile:
    module: str  # dotted module name, e.g. "json.decoder" ("json" for json/__init__.py)
    path: str  # posix path relative to the stdlib directory
    text: str


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _candidate_paths(root: Path) -> list[Path]:
    paths = []
    for entry in root.iterdir():
        if entry.name.removesuffix(".py") not in sys.stdlib_module_names or entry.name in SKIP_DIRS:
            continue  # site-packages, config dirs, lib-dynload, ...
        if entry.is_file() and entry.suffix == ".py":
            paths.append(entry)
        elif entry.is_dir():
            for dirpath, dirnames, filenames in os.walk(entry):
                dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
                paths += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files(max_files: int | None = None, root: Path = STDLIB) -> Iterator[SourceFile]:
    """Standard-library source files in sorted path order, skipping test suites, generated
    files and files that are not valid UTF-8."""
    count = 0
    for path in _candidate_paths(root):
        if max_files is not None and count >= max_files:
            return
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if GENERATED.search(text[:2000]):
            continue
        rel = path.relative_to(root)
        yield SourceFile(_module_name(rel), rel.as_posix(), text)
        count += 1


def truncate_utf8(text: str, max_bytes: int) -> str:
    """At most max_bytes of UTF-8, cut at a line end so no line is left half-written."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[: data.rfind(b"\n", 0, max_bytes) + 1].decode("utf-8")


def code_document(f: SourceFile, max_bytes: int = MAX_FILE_BYTES) -> dict:
    return {"id": f.module, "source": f.path, "text": truncate_utf8(f.text, max_bytes)}


@dataclass(frozen=True)
class DocEntry:
    qualname: str  # relative to the module: "dumps", "JSONDecoder.decode"
    kind: str  # "class" | "function" | "method"
    signature: str  # "(obj, *, skipkeys=False)" or the class bases "(ValueError)"
    doc: str


@dataclass(frozen=True)
class ModuleDocs:
    module: str
    path: str
    doc: str | None
    entries: list[DocEntry]

    def render(self) -> str:
        """pydoc-like plain text: the module docstring, then each documented public name."""
        parts = [f"Module {self.module}"]
        if self.doc:
            parts.append(self.doc)
        for e in self.entries:
            head = f"class {e.qualname}{e.signature}" if e.kind == "class" else f"{e.qualname}{e.signature}"
            parts.append(head + "\n" + "\n".join("    " + line if line else "" for line in e.doc.splitlines()))
        return "\n\n".join(parts)


def _public(name: str) -> bool:
    return not name.startswith("_")


def _entries(body: list[ast.stmt], prefix: str = "", in_class: bool = False) -> Iterator[DocEntry]:
    for node in body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or not _public(node.name):
            continue
        qualname = prefix + node.name
        doc = ast.get_docstring(node)
        if isinstance(node, ast.ClassDef):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            if doc:
                yield DocEntry(qualname, "class", f"({bases})" if bases else "", doc)
            if not in_class:  # methods, not classes nested in classes
                yield from _entries(node.body, qualname + ".", in_class=True)
        elif doc:
            yield DocEntry(qualname, "method" if in_class else "function", f"({ast.unparse(node.args)})", doc)


def module_docs(f: SourceFile) -> ModuleDocs | None:
    """The docstrings of a public module, or None (private module, no docstrings, or
    source this Python cannot parse)."""
    if not all(_public(part) for part in f.module.split(".")):
        return None
    try:
        with warnings.catch_warnings():  # old files trip invalid-escape SyntaxWarnings
            warnings.simplefilter("ignore")
            tree = ast.parse(f.text, filename=f.path)
    except SyntaxError:
        return None
    docs = ModuleDocs(f.module, f.path, ast.get_docstring(tree), list(_entries(tree.body)))
    return docs if docs.doc or docs.entries else None


def docs_document(docs: ModuleDocs) -> dict:
    # Same id as the module's code document, so both land in the same split.
    return {"id": docs.module, "source": docs.path, "text": docs.render()}


def topic_documents(max_topics: int | None = None) -> list[dict]:
    """pydoc's topic texts (the language reference sections behind `help('assert')`)."""
    from pydoc_data.topics import topics  # a plain dict of strings, safe to import

    names = sorted(topics)[:max_topics]
    return [{"id": f"topic:{name}", "source": f"pydoc_data/topics.py:{name}", "text": topics[name].strip()}
            for name in names]
