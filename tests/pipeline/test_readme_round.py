"""The README's "One ERPD round" block, run as written on the tiny recipe: only the paths and
the process count are substituted (the model, the data, the process count of torchrun)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline.readme_fixtures import save_tiny_qwen3, write_prompts
from tests.train.fixtures import ROOT

RECIPE = ROOT / "configs/recipes/tiny-cpu.yaml"


def readme_round_commands() -> list[str]:
    """The command lines of the first ```bash block under "## One ERPD round"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## One ERPD round") :]
    block = section[section.index("```bash\n") + 8 :]
    block = block[: block.index("```")]
    return [
        line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def substitute(line: str, tmp: Path) -> list[str]:
    """Paths (recipe, models, data, tools/) and the process count; nothing else."""
    line = line.replace("--nproc-per-node 8", "--nproc-per-node 1").replace("--tp 2", "--tp 1")
    line = line.replace("/models/", f"{tmp}/models/").replace("/data/", f"{tmp}/data/")
    line = re.sub(r"--config R\b", f"--config {RECIPE}", line)
    argv = shlex.split(line)
    return [str(ROOT / a) if a.startswith("tools/") else a for a in argv]


@pytest.mark.slow
def test_readme_round_runs_as_written(tmp_path):
    save_tiny_qwen3(tmp_path / "models/Qwen3-4B")
    write_prompts(tmp_path / "data/train.parquet", 16)
    write_prompts(tmp_path / "data/heldout.parquet", 8, offset=3)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # a user's plain shell
    env["PATH"] = (
        str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    )  # .venv/bin first
    env.update(OMP_NUM_THREADS="1", ERPD_PROGRESS_INTERVAL="60")
    commands = readme_round_commands()
    assert [shlex.split(c)[0] for c in commands] == [
        "python",
        "erpd",
        "torchrun",
        "torchrun",
        "torchrun",
        "python",
        "erpd",
    ], commands
    outputs = []
    for line in commands:
        argv = substitute(line, tmp_path)
        t0 = time.perf_counter()
        p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        print(f"{time.perf_counter() - t0:6.1f}s  {argv[0]} {argv[1]}")
        assert p.returncode == 0, f"{line}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        outputs.append((line, p.stdout, p.stderr))
    x = tmp_path / "runs/x"
    rows = json.loads((x / "eval/results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["base", "student"]
    assert not (tmp_path / "runs/tiny-cpu").exists()  # nothing under the recipe's own output_dir
    # Stage 2 counts its tokens in the timing log (it logged 0 before)
    timing = [json.loads(t) for t in (x / "stage2/stage2_timing.jsonl").read_text().splitlines()]
    assert timing and all(t["tokens"] > 0 for t in timing), timing[:2]
    for line, _out, err in outputs:
        # TE/Apex fallbacks: one info line per process, not one warning per megatron module
        assert (
            len(
                re.findall(r"(?i)(transformer engine|apex)( and apex)? (is|are) not installed", err)
            )
            <= 1
        ), (line, err[:3000])
        if "stage" in line or "cache" in line:  # trainer bars into a pipe: plain lines
            assert "\r" not in err, (line, err[:2000])
    assert outputs[-1][1].count("# Evaluation") == 1
