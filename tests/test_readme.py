"""The README's Python examples: each block runs on its own once pasted (its imports are in it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_every_python_block_imports_the_modules_it_uses() -> None:
    """The second example used torch.optim and torch.randperm without `import torch`: a NameError when pasted."""
    blocks = _python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        tree = ast.parse(block)
        imported = {
            a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        }
        imported |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        used = {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
        modules = {"torch", "np", "numpy", "csaligner", "F"}
        assert not (used & modules) - imported, f"a README block uses {sorted((used & modules) - imported)} unimported"
