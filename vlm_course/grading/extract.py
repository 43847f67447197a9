"""Pull a learner's definitions out of a notebook without running it.

Grading must not execute a lesson top to bottom: that would train, plot and open widgets, and any
unfinished exercise would stop the run at its `raise NotImplementedError`. So we parse every code cell
and execute only the statements that *define* things, in notebook order, in a fresh namespace:

    import ... / from ... import ...          kept
    def ... / class ...                       kept (decorators and default values run, bodies do not)
    NAME = <literal>                          kept (numbers, strings, tuples of literals, ...)
    everything else (calls, loops, ifs, ...)  skipped

Later definitions replace earlier ones, as when a learner re-runs a fixed cell further down.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat

ERRORS_KEY = "__extraction_errors__"  # list of strings: cells that did not parse, imports that failed


def extract_definitions(notebook_path) -> dict:
    """Execute only the imports, defs, classes and literal constants of a notebook's code cells.

    Returns the namespace (a dict). Problems that would hide a definition (a cell with a syntax error, an
    import that fails) are listed under `namespace[ERRORS_KEY]` instead of raised, so one broken cell only
    fails the exercises it defines.
    """
    path = Path(notebook_path)
    notebook = nbformat.read(path, as_version=4)
    namespace: dict = {"__name__": f"notebook_{_identifier(path.stem)}", "__file__": str(path), ERRORS_KEY: []}
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        where = f"{path.name} cell {index}"
        try:
            tree = ast.parse(to_python(cell.source), filename=where)
        except SyntaxError as err:
            namespace[ERRORS_KEY].append(f"{where} has a syntax error (line {err.lineno}): {err.msg}")
            continue
        for node in tree.body:
            if not is_definition(node):
                continue
            code = compile(ast.Module(body=[node], type_ignores=[]), where, "exec")
            try:
                exec(code, namespace)  # noqa: S102 - a definition only: no top-level calls run
            except Exception as err:  # noqa: BLE001
                namespace[ERRORS_KEY].append(f"{where} line {node.lineno}: {type(err).__name__}: {err}")
    return namespace


def is_definition(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return True
    if isinstance(node, ast.Assign):
        return all(isinstance(t, ast.Name) for t in node.targets) and _is_literal(node.value)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.value is not None and _is_literal(node.value)
    return False


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def to_python(source: str) -> str:
    """Turn IPython syntax (%magics, !shell) into plain Python so the cell parses; those lines become calls,
    which extraction then skips."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:  # no IPython: neutralise magic lines by hand, keeping indentation
        lines = []
        for line in source.splitlines():
            stripped = line.lstrip()
            indent = line[: len(line) - len(stripped)]
            lines.append(f"{indent}pass" if stripped.startswith(("%", "!")) else line)
        return "\n".join(lines)
    return TransformerManager().transform_cell(source)


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)
