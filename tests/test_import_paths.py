"""Every `from vlm_course... import name` in the lessons, solutions, graded tests, benchmarks and docs still works.

The library is split into packages as it grows (training/, evaluation/, viz/, ...); their `__init__.py` files
re-export what callers import, so an import written against an earlier layout keeps working. This test reads
those imports from the files themselves, so a new lesson is covered without a list to update.
"""

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def sources():
    for folder in ("lessons", "solutions"):
        for notebook in sorted((ROOT / folder).glob("*.ipynb")):
            for cell in json.loads(notebook.read_text())["cells"]:
                if cell["cell_type"] == "code":  # without IPython's %magics and !shell lines
                    lines = "".join(cell["source"]).splitlines()
                    yield "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))
    for folder in ("exercises_tests", "benchmarks"):
        for file in sorted((ROOT / folder).rglob("*.py")):
            yield file.read_text()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        yield from re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def imported_names():
    found = set()
    for text in sources():
        try:
            tree = ast.parse(text)
        except SyntaxError:  # a snippet that is not plain Python on its own
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vlm_course"):
                found |= {(node.module, alias.name) for alias in node.names if alias.name != "*"}
            elif isinstance(node, ast.Import):
                found |= {(alias.name, None) for alias in node.names if alias.name.startswith("vlm_course")}
    return sorted(found, key=str)


@pytest.mark.parametrize("module, name", imported_names())
def test_import_still_works(module, name):
    imported = importlib.import_module(module)
    if name is not None and not hasattr(imported, name):
        importlib.import_module(f"{module}.{name}")  # `from package import submodule`
