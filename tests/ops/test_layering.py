"""The pure token-math modules import no Megatron and no torch.distributed (one-way layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import erpd_megatron.ops as ops_pkg

PURE = ["common.py", "kl.py", "losses.py", "signals.py"]
FORBIDDEN = ("megatron", "torch.distributed", "erpd_megatron.ops.vocab_parallel")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_pure_modules_import_no_megatron_or_distributed():
    root = Path(ops_pkg.__file__).parent
    for name in PURE:
        for imp in _imports(root / name):
            assert not any(imp == f or imp.startswith(f + ".") for f in FORBIDDEN), (name, imp)


def test_vocab_parallel_imports_no_megatron():
    root = Path(ops_pkg.__file__).parent
    assert not any(i.startswith("megatron") for i in _imports(root / "vocab_parallel.py"))
