"""Fault injection for `erpd round`: SIGKILL at random moments and rerun; corrupt artefacts.

Kill campaign (:func:`kill_campaign`): one uninterrupted reference round, then K trials. A
trial starts the round in its own process group, SIGKILLs the whole group (the step's process
tree with it, as a node failure would) at a seeded moment inside a chosen step (a uniform draw
over that step's duration in the reference run, counted from the moment the trial starts the
step), reruns the same command to completion, and compares the final student weights (every
tensor of the Megatron checkpoint, read with ``dist_checkpointing.load_plain_tensors``) and the
exported HF tensors bit for bit with the reference. To keep a campaign short, the outputs of
the steps *before* the chosen one are copied from the reference (the state a kill in that step
finds: earlier steps finished and recorded in ``round_state.json``); the chosen step and every
later one run, are killed and rerun for real.

Corruption (:func:`corruption_campaign`): single flipped bytes at several positions and
truncations of each artefact kind (rollout shard, cache shard, cache manifest, checkpoint
files), each on a fresh copy, followed by the consuming step's up-front open / check. Each
outcome is ``named`` (an error naming the damaged file), ``unnamed`` (an error that does not
name it) or ``silent`` (no error).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

# (kind, round_state step name, outputs under round_<r>/, start of the step's log title)
STEPS: list[tuple[str, str, list[str], str]] = [
    ("convert", "policy_mcore", ["policy_mcore"], "convert pi_r"),
    ("rollout", "rollouts", ["rollouts"], "rollouts from"),
    ("stage1", "s1_teacher", ["s1_teacher"], "stage 1 "),
    ("cache", "cache", ["cache"], "teacher cache"),
    ("stage2", "s2_student", ["s2_student"], "stage 2 "),
    ("export", "export", ["hf"], "export models"),
    ("eval", "eval", ["eval"], "evaluate"),
]
KINDS = [s[0] for s in STEPS]
STUDENT_FINAL = "s2_student/stage2/checkpoints/final"


def step_kind(title: str) -> str | None:
    """The kind of a step from its log title (``round 0: stage 1 'teacher'`` -> ``stage1``)."""
    title = title.split(": ", 1)[-1]
    return next((k for k, _, _, start in STEPS if title.startswith(start)), None)


@dataclass
class RoundRun:
    """One start of `erpd round`: its exit code, step events and where a kill landed."""

    returncode: int
    events: list[tuple[float, str, str]] = field(default_factory=list)
    """(seconds since start, "run" | "done" | "skip", step kind)."""
    killed: dict | None = None
    """{"kind": planned kind, "hit": kind running at the kill (or "between"), "at_s": seconds
    into that step, "planned_s": planned delay} or None when no kill happened."""
    log_tail: str = ""

    def durations(self) -> dict[str, float]:
        """Seconds each step ran (run -> done)."""
        start, out = {}, {}
        for t, what, kind in self.events:
            if what == "run":
                start[kind] = t
            elif what == "done" and kind in start:
                out[kind] = t - start[kind]
        return out


def run_round(
    cmd: Sequence[str],
    env: dict,
    cwd: Path,
    log_path: Path,
    kill: tuple[str, float] | None = None,
    timeout: float = 1800,
) -> RoundRun:
    """Run ``cmd`` in a new process group; with ``kill=(kind, delay)`` SIGKILL the group
    ``delay`` seconds after the step of ``kind`` starts (or as soon as it has finished, if
    it finishes earlier: the kill then lands in whatever runs next)."""
    t0 = time.monotonic()
    events: list[tuple[float, str, str]] = []
    tail: list[str] = []
    with open(log_path, "a") as logf:
        proc = subprocess.Popen(
            list(cmd),
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

        def reader() -> None:
            for line in proc.stdout:
                logf.write(line)
                tail.append(line)
                del tail[:-200]
                for tag, what in (("[run ] ", "run"), ("[done] ", "done"), ("[skip] ", "skip")):
                    if tag in line:
                        kind = step_kind(line.split(tag, 1)[1].strip())
                        if kind:
                            events.append((time.monotonic() - t0, what, kind))

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        killed = None
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if kill is not None and killed is None:
                kind, delay = kill
                started = [t for t, w, k in events if k == kind and w == "run"]
                ended = [t for t, w, k in events if k == kind and w == "done"]
                if started and (time.monotonic() - t0 - started[-1] >= delay or ended):
                    now = time.monotonic() - t0
                    os.killpg(proc.pid, signal.SIGKILL)
                    running = [e for e in events if e[1] in ("run", "done")]
                    hit, at = "between", 0.0
                    if running and running[-1][1] == "run":
                        hit, at = running[-1][2], now - running[-1][0]
                    killed = {
                        "kind": kind,
                        "hit": hit,
                        "at_s": round(at, 2),
                        "planned_s": round(delay, 2),
                    }
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        th.join(timeout=10)
    return RoundRun(proc.returncode, events, killed, "".join(tail[-40:]))


def _load_digests(paths: list[str]) -> list[dict[str, str]]:
    """Child process: sha256 of every tensor (dtype, shape, bytes) of Megatron checkpoints."""
    import tempfile

    import torch.distributed as dist

    store = os.path.join(tempfile.mkdtemp(prefix="erpd-faults-"), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        from megatron.core import dist_checkpointing

        out = []
        for p in paths:
            sd = dist_checkpointing.load_plain_tensors(p)
            out.append({k: tensor_digest(v) for k, v in sorted(sd.items()) if hasattr(v, "shape")})
        return out
    finally:
        dist.destroy_process_group()


def tensor_digest(t) -> str:
    """sha256 over a tensor's dtype, shape and raw bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_digests(paths: Sequence[Path]) -> list[dict[str, str]]:
    """Per-tensor digests of Megatron checkpoints, read in one spawned child process."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_load_digests, ([str(p) for p in paths],))


def hf_digests(hf_dir: Path) -> dict[str, str]:
    """Per-tensor digests of an HF export's safetensors files."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update({k: tensor_digest(v) for k, v in load_file(str(f)).items()})
    return out


def eval_rows(round_dir: Path) -> list | None:
    """The evaluation table's rows without their wall-clock ``seconds``, and the names of the
    evaluation's files (None when the round did not evaluate)."""
    p = round_dir / "eval" / "results.json"
    if not p.exists():
        return None
    rows = json.loads(p.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows] + sorted(
        os.listdir(p.parent)
    )


def seed_prefix(ref_round: Path, run_round_dir: Path, kind: str) -> list[str]:
    """Copy the reference's outputs and recorded state of the steps before ``kind``."""
    run_round_dir.mkdir(parents=True)
    state = json.loads((ref_round / "round_state.json").read_text())["steps"]
    names = []
    for k, name, outputs, _ in STEPS:
        if k == kind:
            break
        if name not in state:  # e.g. no conversion from round 1 on
            continue
        for o in outputs:
            if (ref_round / o).exists():
                shutil.copytree(ref_round / o, run_round_dir / o, symlinks=True)
        names.append(name)
    (run_round_dir / "round_state.json").write_text(
        json.dumps({"steps": {n: state[n] for n in names}})
    )
    return names


def kill_campaign(
    work: Path,
    cmd: Sequence[str],
    env: dict,
    cwd: Path,
    *,
    k: int,
    seed: int,
    kinds: Sequence[str] = KINDS,
    report: Callable[[str], None] = print,
) -> dict:
    """Reference round in ``work/run`` (moved to ``work/ref``), then ``k`` kill-and-rerun trials
    (step kinds in turn, seeded uniform moments). ``cmd`` must write to ``work/run``.
    Returns the figures: per trial the kind planned, the step hit and bit-identity."""
    work = Path(work)
    run_dir, ref_dir, ref_json = work / "run", work / "ref", work / "reference.json"
    for d in (run_dir, work / "trials"):
        shutil.rmtree(d, ignore_errors=True)
    (work / "trials.jsonl").unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if ref_json.exists() and (ref_dir / "round_0" / STUDENT_FINAL).exists():  # same command, kept
        dur = json.loads(ref_json.read_text())["step_s"]
        report(f"reusing the reference round in {ref_dir}")
    else:
        shutil.rmtree(ref_dir, ignore_errors=True)
        ref = run_round(cmd, env, cwd, work / "reference.log")
        if ref.returncode != 0:
            raise RuntimeError(f"reference round failed ({ref.returncode}):\n{ref.log_tail}")
        dur = ref.durations()
        run_dir.rename(ref_dir)
        ref_json.write_text(json.dumps({"step_s": dur, "cmd": list(cmd)}))
    report(
        f"reference round: {time.time() - t0:.0f}s; step seconds "
        + ", ".join(f"{k_}={v:.1f}" for k_, v in dur.items())
    )
    ref_round = ref_dir / "round_0"
    rng = random.Random(seed)
    report(f"kill seed {seed}, K={k}")
    trials = []
    for i in range(k):
        kind = kinds[i % len(kinds)]
        u = rng.random()
        delay, t1, missed = u * dur[kind], time.time(), []
        for _ in range(3):  # a step faster than in the reference run: again, at u of its new length
            seed_prefix(ref_round, run_dir / "round_0", kind)
            first = run_round(cmd, env, cwd, work / f"trial{i:02d}.log", kill=(kind, delay))
            if (first.killed and first.killed["hit"] == kind) or kind not in first.durations():
                break
            missed.append(first.killed or {"kind": kind, "hit": "none (the round finished)"})
            delay = u * first.durations()[kind]
            shutil.rmtree(run_dir)
        second = run_round(cmd, env, cwd, work / f"trial{i:02d}.log")
        rec = {
            "trial": i,
            "kind": kind,
            "planned_s": round(delay, 2),
            "killed": first.killed,
            "first_rc": first.returncode,
            "rerun_rc": second.returncode,
            "rerun_ran": [kd for _, w, kd in second.events if w == "run"],
            "missed": missed,
        }
        if second.returncode == 0:
            keep = work / "trials" / f"{i:02d}"
            shutil.copytree(run_dir / "round_0" / STUDENT_FINAL, keep / "final")
            rec["hf_identical"] = all(
                hf_digests(run_dir / "round_0/hf" / m) == hf_digests(ref_round / "hf" / m)
                for m in os.listdir(ref_round / "hf")
            )
            rec["eval_identical"] = eval_rows(run_dir / "round_0") == eval_rows(ref_round)
            if (run_dir / "round_0/eval/results.json").exists():
                shutil.copy(run_dir / "round_0/eval/results.json", keep / "results.json")
        else:
            rec["log_tail"] = second.log_tail
        rec["seconds"] = round(time.time() - t1, 1)
        trials.append(rec)
        with open(work / "trials.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        report(
            f"trial {i}: kill planned in {kind} at {delay:.1f}s, hit "
            f"{first.killed and first.killed['hit']} at {first.killed and first.killed['at_s']}s "
            f"(rc {first.returncode}); rerun rc {second.returncode}, ran {rec['rerun_ran']} "
            f"({rec['seconds']}s)"
        )
        shutil.rmtree(run_dir)
    finals = [ref_round / STUDENT_FINAL] + [
        work / "trials" / f"{t['trial']:02d}/final" for t in trials if t["rerun_rc"] == 0
    ]
    digests = checkpoint_digests(finals)
    it = iter(digests[1:])
    for t in trials:
        if t["rerun_rc"] == 0:
            d = next(it)
            t["weights_identical"] = d == digests[0]
            t["tensors"] = len(d)
            t["differing"] = sorted(x for x in d if d[x] != digests[0].get(x))[:5]
        else:
            t["weights_identical"] = False
    n_ok = sum(t["weights_identical"] and t.get("hf_identical", False) for t in trials)
    return {
        "K": k,
        "seed": seed,
        "identical": n_ok,
        "reference_step_s": dur,
        "hits": {
            kd: sum(1 for t in trials if t["killed"] and t["killed"]["hit"] == kd) for kd in KINDS
        },
        "trials": trials,
        "minutes": round((time.time() - t0) / 60, 1),
    }


# ---- corruption --------------------------------------------------------------------------

ARTEFACTS: list[tuple[str, str, str]] = [
    # (kind, file under round_<r>/, the copied directory the consumer opens)
    ("rollout shard", "rollouts/shard-00000.parquet", "rollouts"),
    ("rollout manifest", "rollouts/manifest.json", "rollouts"),
    ("cache shard", "cache/rank00000-00000.erpdc", "cache"),
    ("cache manifest", "cache/manifest.json", "cache"),
    (
        "checkpoint data",
        "s1_teacher/stage1/checkpoints/final/__0_0.distcp",
        "s1_teacher/stage1/checkpoints/final",
    ),
    (
        "checkpoint metadata",
        "s1_teacher/stage1/checkpoints/final/.metadata",
        "s1_teacher/stage1/checkpoints/final",
    ),
    (
        "checkpoint common.pt",
        "s1_teacher/stage1/checkpoints/final/common.pt",
        "s1_teacher/stage1/checkpoints/final",
    ),
    (
        "model_config.yaml",
        "s1_teacher/stage1/checkpoints/final/model_config.yaml",
        "s1_teacher/stage1/checkpoints/final",
    ),
    (
        "checkpoint.json",
        "s1_teacher/stage1/checkpoints/final/checkpoint.json",
        "s1_teacher/stage1/checkpoints/final",
    ),
]


def corruptions(
    data: bytes, rng: random.Random, flips: int = 5, truncations: int = 2, digits: int = 2
) -> list[tuple[str, int]]:
    """("flip", pos): every bit of the first, the last and seeded bytes; ("truncate", size):
    cut at half and at one byte short; ("digit", pos): a seeded ASCII digit changed to another
    digit (a damaged text file that still parses: JSON / YAML numbers and hashes)."""
    size = len(data)
    pos = [0, size - 1] + sorted(rng.sample(range(1, size - 1), max(0, flips - 2)))
    cuts = [size // 2, size - 1, 0, size // 3][:truncations]
    out = [("flip", p) for p in pos[:flips]] + [("truncate", c) for c in cuts]
    numerals = [i for i, b in enumerate(data) if 48 <= b <= 57]
    if numerals and digits:
        out += [("digit", p) for p in sorted(rng.sample(numerals, min(digits, len(numerals))))]
    return out


def damage(path: Path, how: str, at: int) -> None:
    """Flip every bit of byte ``at`` (``flip``), change the digit at ``at`` (``digit``) or cut
    the file to ``at`` bytes (``truncate``)."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[at] ^= 0xFF
    elif how == "digit":
        data[at] = 48 + (data[at] - 48 + 1) % 10
    else:
        del data[at:]
    path.write_bytes(bytes(data))


def classify(error: str | None, path: Path) -> str:
    """named / unnamed / silent."""
    if error is None:
        return "silent"
    return "named" if path.name in error else "unnamed"


def _open_rollouts(d: Path) -> None:
    from erpd_megatron.data.rollouts import RolloutSet

    rs = RolloutSet.open(d)
    sum(1 for _ in rs)  # the trainers then read every row


def cache_expectations(rollouts: Path, vocab: int) -> dict:
    """What Stage 2 checks a cache against: the student's vocabulary, the rollout data's
    fingerprint and every sample's response length."""
    from erpd_megatron.data.rollouts import RolloutSet

    rs = RolloutSet.open(rollouts)
    return {
        "expect_vocab_size": vocab,
        "expect_rollout_fingerprint": rs.fingerprint,
        "expect_token_counts": {int(r.sample_id): len(r.response_token_ids) for r in rs},
    }


def _open_cache(d: Path, expect: dict) -> None:
    """What Stage 2 does before any step (``TeacherCache.open`` with its expectations), then
    read every record as training does."""
    from erpd_megatron.cache.reader import TeacherCache

    cache = TeacherCache.open(d, **expect)
    try:
        for _ in cache.stream():
            pass
    finally:
        cache.close()


def _load_checkpoints(ref: str, copies: list[str]) -> list[str | None]:
    """Child process: ``load_checkpoint`` (as the cache tool and the trainers call it) of each
    copy into one model built from the pristine checkpoint's config; the error or None."""
    from erpd_megatron.models import checkpoint as ckpt_io
    from erpd_megatron.models.convert import _bare_model, _conversion_config
    from erpd_megatron.runtime.distributed import init_distributed

    mc = ckpt_io.read_model_config(ref)
    cfg = _conversion_config(mc, 1, 1, "float32")
    init_distributed(cfg)
    model = _bare_model(cfg)
    out = []
    for c in copies:
        try:
            ckpt_io.load_checkpoint(c, [model], model_cfg=mc)
            out.append(None)
        except BaseException as e:  # noqa: BLE001 - every failure is an outcome here
            out.append(f"{type(e).__name__}: {e}")
    return out


def corruption_campaign(
    ref_round: Path,
    work: Path,
    *,
    seed: int = 0,
    flips: int = 5,
    truncations: int = 2,
    digits: int = 2,
    kinds: Sequence[str] | None = None,
    cache_expect: dict | None = None,
) -> dict:
    """Damage each artefact of ``ref_round`` (one fresh copy per damage) and run its consumer's
    open / check (the pristine artefacts first: they must pass). ``cache_expect``: what the
    cache is checked against (default: :func:`cache_expectations` of the round's rollouts).
    Returns counts per kind and every case with its message."""
    import multiprocessing as mp

    from erpd_megatron.models.checkpoint import read_model_config

    ref_round, work = Path(ref_round), Path(work)
    shutil.rmtree(work, ignore_errors=True)
    rng = random.Random(seed)
    cases, pending = [], []
    if cache_expect is None:
        vocab = read_model_config(ref_round / "policy_mcore").vocab_size  # the student's
        cache_expect = cache_expectations(ref_round / "rollouts", vocab)
    for check, what in (
        (lambda: _open_rollouts(ref_round / "rollouts"), "rollouts"),
        (lambda: _open_cache(ref_round / "cache", cache_expect), "cache"),
    ):
        err = _error(check)
        if err:
            raise RuntimeError(f"the pristine {what} fail their check: {err}")
    ckpt_dir = ARTEFACTS[-1][2]
    if kinds is None or any(not k.startswith(("rollout", "cache")) for k in kinds):
        pending.append(({"kind": "pristine"}, ref_round / ckpt_dir))
    for kind, rel, dir_rel in ARTEFACTS:
        if kinds is not None and kind not in kinds:
            continue
        src = ref_round / rel
        text = src.suffix in (".json", ".yaml")
        for j, (how, at) in enumerate(
            corruptions(src.read_bytes(), rng, flips, truncations, digits if text else 0)
        ):
            dst_dir = work / f"{kind.replace(' ', '_')}-{j}" / dir_rel
            shutil.copytree(ref_round / dir_rel, dst_dir)
            target = dst_dir / Path(rel).relative_to(dir_rel)
            damage(target, how, at)
            case = {"kind": kind, "file": rel, "how": how, "at": at, "target": str(target)}
            if target.read_bytes().rstrip() == src.read_bytes().rstrip():  # only whitespace cut
                case.update(error=None, outcome="no-op")
                cases.append(case)
                continue
            if kind.startswith("rollout"):
                case["error"] = _error(lambda d=dst_dir: _open_rollouts(d))
            elif kind.startswith("cache"):
                case["error"] = _error(lambda d=dst_dir: _open_cache(d, cache_expect))
            else:
                pending.append((case, dst_dir))
            cases.append(case)
    if pending:
        with mp.get_context("spawn").Pool(1) as pool:
            errors = pool.apply(
                _load_checkpoints, (str(ref_round / ckpt_dir), [str(d) for _, d in pending])
            )
        if errors[0] is not None:
            raise RuntimeError(f"the pristine checkpoint fails to load: {errors[0]}")
        for (case, _), err in zip(pending[1:], errors[1:]):
            case["error"] = err
    counts: dict[str, dict[str, int]] = {}
    for c in cases:
        c.setdefault("outcome", classify(c["error"], Path(c["target"])))
        counts.setdefault(c["kind"], {"named": 0, "unnamed": 0, "silent": 0, "no-op": 0})[
            c["outcome"]
        ] += 1
    return {"seed": seed, "counts": counts, "cases": cases}


def _error(fn: Callable[[], None]) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every failure is an outcome here
        return f"{type(e).__name__}: {e}"
    return None
