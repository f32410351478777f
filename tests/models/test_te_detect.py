"""Transformer Engine detection, FP8 recipe checks, and the bf16 logits of the wrapped model.

* TE absent (this machine): the status says so and an FP8 config is refused with the repair.
* TE broken: a real ``transformer_engine`` package whose ``pytorch`` import raises (as a TE
  torch extension built against another torch does) is put on the child's ``sys.path``;
  ``find_spec`` finds it, megatron's own ``HAVE_TE`` turns False (its MagicMock stand-in),
  and the probe refuses the TE spec with the repair message.
* The same child builds a tiny bf16 model on the CPU harness: its logits come out in bf16
  (megatron's default is an fp32 copy), and it reports the logits bytes per micro-batch.

The child is this file run as a script (one megatron import for all of it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BROKEN_MSG = "undefined symbol: _ZN3c1017RegisterOperatorsD1Ev (built against another torch)"


def _cfg(*overrides: str):
    from erpd_megatron.config import load_config

    return load_config(ROOT / "configs/recipes/tiny-cpu.yaml", list(overrides), validate=False)


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is not None,
    reason="Transformer Engine is installed here",
)
def test_absent_te_is_reported_and_fp8_refused():
    from erpd_megatron.config.loader import ConfigError
    from erpd_megatron.config.validate import validate_config
    from erpd_megatron.models.builder import transformer_config, transformer_engine_status

    st = transformer_engine_status()
    assert not st.installed and not st.usable and not st.megatron_have_te
    cfg = _cfg("precision.fp8=hybrid", "precision.transformer_impl=auto")
    with pytest.raises(
        ConfigError,
        match=r"precision\.fp8='hybrid' needs Transformer Engine, which is not "
        r"installed.*--no-build-isolation",
    ):
        transformer_config(cfg)
    with pytest.raises(ConfigError, match=r"not usable here.*make install"):
        validate_config(cfg, check_runtime=True)


def _write_broken_te(root: Path) -> Path:
    pkg = root / "transformer_engine"
    (pkg / "pytorch").mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "2.11.0"\n')
    (pkg / "pytorch" / "__init__.py").write_text(f"raise ImportError({BROKEN_MSG!r})\n")
    return root


def _run_child(mode: str, tmp_path: Path, pythonpath: list[str]) -> subprocess.Popen:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([*pythonpath, str(ROOT)]),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    return subprocess.Popen(
        [sys.executable, __file__, mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(tmp_path),
    )


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=300)
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_broken_te_install_fails_with_the_repair_and_logits_stay_bf16(tmp_path):
    # both children at once: each is mostly one megatron import
    broken = _run_child("broken", tmp_path, [str(_write_broken_te(tmp_path / "site"))])
    clean = _run_child("bf16", tmp_path, [])
    res, bf16 = _result(broken), _result(clean)
    # the fake package is what find_spec sees; TE's own import and megatron's HAVE_TE both fail
    assert res["found_at"].startswith(str(tmp_path))
    assert (
        res["installed"]
        and not res["imports"]
        and not res["megatron_have_te"]
        and not res["usable"]
    )
    assert BROKEN_MSG in res["error"]
    assert (
        "is installed but unusable" in res["te_spec_error"]
        and "--no-build-isolation" in res["te_spec_error"]
    )
    assert "is installed but unusable" in res["fp8_error"]
    # megatron.core itself does not import with such a TE (tensor_parallel/random.py catches only
    # ModuleNotFoundError): init_distributed says so with the repair, before importing it
    assert (
        "Transformer Engine is installed but unusable" in res["init_error"]
        and BROKEN_MSG in res["init_error"]
    )
    assert "make install" in res["init_error"]
    # bf16 logits, half the bytes of megatron's default fp32 copy, same values
    assert bf16["logits_dtype"] == "torch.bfloat16" and bf16["fp32_output_dtype"] == "torch.float32"
    assert bf16["logits_bytes"] * 2 == bf16["fp32_logits_bytes"] and bf16["same_values"]
    assert bf16["fp8_toggle"] == [None, "hybrid", "hybrid"]
    print(
        "logits bytes per micro-batch (bf16 / fp32):",
        bf16["logits_bytes"],
        bf16["fp32_logits_bytes"],
    )


def test_fp8_recipe_problem_by_capability():
    from erpd_megatron.config.validate import fp8_recipe_problem

    for cc in [(9, 0), (9, 1)]:
        msg = fp8_recipe_problem("mxfp8", cc)
        assert msg and "Hopper-class GPU is 9." in msg and "delayed or tensorwise" in msg
        for ok in ("delayed", "tensorwise", "blockwise"):
            assert fp8_recipe_problem(ok, cc) is None
    assert fp8_recipe_problem("mxfp8", (10, 0)) is None
    assert "Blackwell" in fp8_recipe_problem("mxfp8", (12, 0))
    assert "8.9 or higher" in fp8_recipe_problem("delayed", (8, 0))
    assert "blockwise needs compute capability 9.0" in fp8_recipe_problem("blockwise", (8, 9))
    assert (
        fp8_recipe_problem("delayed", (8, 9)) is None and fp8_recipe_problem("mxfp8", None) is None
    )


def _broken_child() -> dict:
    from erpd_megatron.config.loader import ConfigError
    from erpd_megatron.models.builder import transformer_engine_status, use_transformer_engine
    from erpd_megatron.runtime.distributed import init_distributed

    st = transformer_engine_status()
    out: dict = {
        "found_at": importlib.util.find_spec("transformer_engine").origin,
        "installed": st.installed,
        "imports": st.imports,
        "megatron_have_te": st.megatron_have_te,
        "usable": st.usable,
        "error": st.error,
    }
    for key, ov in (
        ("te_spec_error", "precision.transformer_impl=transformer_engine"),
        ("fp8_error", "precision.fp8=e4m3 precision.transformer_impl=auto"),
    ):
        try:
            use_transformer_engine(_cfg(*ov.split()))
            out[key] = "no error"
        except ConfigError as e:
            out[key] = str(e)
    try:
        init_distributed(_cfg())
        out["init_error"] = "no error"
    except ConfigError as e:
        out["init_error"] = str(e)
    return out


def _bf16_child() -> dict:
    import torch

    from erpd_megatron.models.builder import build_model, fp8_disabled_without_grad, get_config
    from erpd_megatron.runtime.distributed import destroy_distributed, init_distributed

    cfg = _cfg("precision.params_dtype=bf16", "precision.transformer_impl=local")
    init_distributed(cfg)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    model[0].eval()
    with torch.no_grad():
        logits = model[0](ids, pos, None)
        ref = model[0](ids, pos, None, fp32_output=True)
    out = dict(
        logits_dtype=str(logits.dtype),
        fp32_output_dtype=str(ref.dtype),
        logits_bytes=logits.numel() * logits.element_size(),
        fp32_logits_bytes=ref.numel() * ref.element_size(),
        same_values=bool(torch.equal(logits.float(), ref)),
    )
    # no-grad passes drop FP8 for their duration, grad-enabled ones keep it
    config = get_config(model[0])
    config.fp8, seen = "hybrid", []
    with torch.no_grad(), fp8_disabled_without_grad(config):
        seen.append(config.fp8)
    with fp8_disabled_without_grad(config):
        seen.append(config.fp8)
    seen.append(config.fp8)
    config.fp8 = None
    out["fp8_toggle"] = seen
    destroy_distributed()
    return out


if __name__ == "__main__":
    result = _broken_child() if sys.argv[1] == "broken" else _bf16_child()
    print("RESULT " + json.dumps(result), flush=True)
