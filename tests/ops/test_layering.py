"""One-way layers: the pure token-math modules import no Megatron and no torch.distributed,
and no package of erpd_megatron imports one above it (DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import erpd_megatron.ops as ops_pkg

PURE = ["common.py", "kl.py", "losses.py", "signals.py"]
FORBIDDEN = (
    "megatron",
    "torch.distributed",
    "erpd_megatron.ops.vocab_parallel",
    "erpd_megatron.ops.vocab_parallel_topk",
)


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
    for name in ("vocab_parallel.py", "vocab_parallel_topk.py"):
        assert not any(i.startswith("megatron") for i in _imports(root / name)), name


# The packages of erpd_megatron from the bottom up (DESIGN.md): a module may import its own
# package and any package below it, never one above. utils (files, logging) sits under all;
# the top-level entry points (cli.py, stage1.py, stage2.py) sit over all.
LAYERS = (
    "utils",
    "config",
    "ops",
    "runtime",
    "models",
    "data",
    "rollout",
    "cache",
    "train",
    "eval",
    "pipeline",
)


def _package_imports(path: Path, pkg_root: Path) -> list[tuple[int, str]]:
    """(line, first package under erpd_megatron) of every erpd_megatron import in ``path``,
    lazy (inside functions) ones included; relative imports resolved against the file."""
    own = path.relative_to(pkg_root).parts
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ("erpd_megatron",) + own[: len(own) - node.level]
                mods = [".".join(base + ((node.module,) if node.module else ()))]
            else:
                mods = [node.module or ""]
        else:
            continue
        for m in mods:
            parts = m.split(".")
            if parts[0] == "erpd_megatron" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


def test_packages_import_only_their_own_layer_or_below():
    pkg_root = Path(ops_pkg.__file__).parent.parent
    rank = {name: i for i, name in enumerate(LAYERS)}
    seen = set(p.name for p in pkg_root.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert seen == set(LAYERS), (
        f"a package without a layer (add it to LAYERS): {seen ^ set(LAYERS)}"
    )
    up = []
    for path in sorted(pkg_root.rglob("*.py")):
        rel = path.relative_to(pkg_root)
        if len(rel.parts) == 1:
            continue  # the entry points (cli.py, stage1.py, ...) sit over every layer
        own = rel.parts[0]
        for line, target in _package_imports(path, pkg_root):
            if target not in rank:
                continue  # erpd_megatron.__version__ and the like
            if rank[target] > rank[own]:
                up.append(f"erpd_megatron/{rel.as_posix()}:{line} imports erpd_megatron.{target}")
    assert not up, "imports pointing up the layers:\n" + "\n".join(up)


def test_layer_check_sees_lazy_and_relative_imports(tmp_path):
    """The walker finds an upward import inside a function and a relative one."""
    pkg = tmp_path / "erpd_megatron" / "train"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def g():\n    from erpd_megatron.eval import stats\n\nfrom ..eval import y\n")
    assert sorted(_package_imports(f, tmp_path / "erpd_megatron")) == [(2, "eval"), (4, "eval")]
