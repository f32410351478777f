"""The round-level sections of the configuration: rollouts, evaluation, a round, the demo.

Split from :mod:`erpd_megatron.config.schema` (which re-exports every class here, so
``from erpd_megatron.config.schema import RolloutConfig`` keeps working) to keep each module
under 600 lines. Same conventions: every field has a docstring, the string literal under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass(kw_only=True)
class RolloutConfig:
    """Generating the fixed rollout data of a round."""

    engine: Literal["hf", "vllm"] = "hf"
    """Generation engine: vllm (GPU) or Hugging Face transformers (CPU default)."""
    model_path: Optional[str] = None
    """HF-format checkpoint that generates (pi_r)."""
    tokenizer_path: Optional[str] = None
    """Tokenizer directory or hub id; null = model_path."""
    dataset: Optional[str] = None
    """Prompt set: a local parquet/jsonl/arrow file or directory, or a hub dataset name."""
    dataset_split: str = "train"
    """Split of the prompt set."""
    dataset_config: Optional[str] = None
    """Configuration (subset) name of a hub prompt set, e.g. "main" for openai/gsm8k."""
    prompt_format: Literal["auto", "gsm8k", "math", "polaris", "custom"] = "auto"
    """Column convention (see README); custom uses question_key/answer_key."""
    question_key: Optional[str] = None
    """Column holding the question (custom format)."""
    answer_key: Optional[str] = None
    """Column holding the reference answer (custom format)."""
    prompt_template: str = "{question}"
    """Template applied to the question before tokenisation."""
    use_chat_template: bool = False
    """Wrap the prompt with the tokenizer's chat template."""
    num_prompts: int = 1000
    """P: prompts sampled per round (all when fewer exist)."""
    samples_per_prompt: int = 16
    """G: samples per prompt."""
    temperature: float = 1.0
    """Sampling temperature (1.0 so that log-probs are exact)."""
    top_p: float = 1.0
    """Nucleus sampling (1.0 so that log-probs are exact)."""
    max_new_tokens: int = 1024
    """Response length limit."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this are filtered out (counted in the manifest)."""
    seed: int = 0
    """Seed of prompt sampling and generation."""
    output_dir: Optional[str] = None
    """Directory of the Parquet shards and manifest.json."""
    prompts_per_shard: int = 64
    """Prompts per Parquet shard (the unit of resume)."""
    batch_size: int = 32
    """Sequences generated at once (hf engine)."""
    reward_fn: str = "erpd_megatron.rollout.verifier:math_reward"
    """Dotted path `module:function(response_text, reference) -> float` of the reward."""
    verifier_timeout: float = 5.0
    """Seconds per answer before the verifier gives up (reward 0)."""
    verifier_workers: int = 0
    """Reward worker processes; 0 = min(8, CPU count)."""
    verifier_memory_mb: int = 4096
    """Address-space cap of a reward worker above its start-up size (MB; 0 = none)."""
    hf_device: str = "auto"
    """Device of the hf engine: auto (cuda when available, else cpu), cpu, cuda, cuda:1..."""
    hf_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Weight dtype of the hf engine; auto = bf16 on a GPU, fp32 on CPU."""
    vllm_tensor_parallel_size: int = 1
    """vLLM tensor parallel size within a node."""
    vllm_gpu_memory_utilization: float = 0.85
    """Fraction of GPU memory vLLM may take."""
    vllm_dtype: str = "bfloat16"
    """vLLM weight dtype."""


@dataclass(kw_only=True)
class EvalModelConfig:
    """One model in an evaluation table."""

    name: str = "base"
    """Row name in the table."""
    path: str = ""
    """HF-format checkpoint directory (generation, and scoring with eval.scoring_backend=hf)."""
    checkpoint: Optional[str] = None
    """Megatron checkpoint directory of the same weights (a stage's ``checkpoints/final`` or
    ``iter_XXXXXXX`` dir, or ``erpd convert hf-to-mcore`` output): the scoring model of
    eval.scoring_backend=megatron, loaded at the recipe's TP/PP."""


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation of base, teachers and students."""

    models: list[EvalModelConfig] = field(default_factory=list)
    """Models to evaluate; the first is the reference for KL-to-base unless base_name is set."""
    base_name: Optional[str] = None
    """Name of the base model for KL(pi || pi_base); null = the first model."""
    datasets: list[str] = field(default_factory=list)
    """Held-out prompt sets (same loader as rollouts)."""
    num_prompts: int = 500
    """Prompts per held-out set."""
    n: int = 4
    """Samples per prompt for avg@n."""
    pass_k: list[int] = field(default_factory=lambda: [1, 4])
    """k values for pass@k (unbiased estimator)."""
    max_new_tokens: int = 1024
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature (KL and entropy are then of the tempered distributions; 0 = greedy,
    which reports no KL or entropy)."""
    output_dir: Optional[str] = None
    """Where tables, JSON and plots go; null = <output_dir>/eval."""
    dataset_split: Optional[str] = None
    """Split of hub / directory held-out sets (e.g. "test"); null = rollout.dataset_split.
    A single local file is one split and ignores this."""
    seed: int = 0
    """Seed of prompt selection and sampling (the same for every model: common random numbers)."""
    metrics_files: list[str] = field(default_factory=list)
    """Training metrics JSONL files to plot; empty = discover stage1_metrics.jsonl and
    stage2_metrics.jsonl one or two folders below the run's output_dir."""
    kl_logprobs: Literal["engine", "teacher_forced"] = "engine"
    """log pi(y_t) used in the sequence KL: the rollout engine's sampled-token log-probs, or a
    teacher-forced pass of pi (same numerics as the pi_base pass; the engine mismatch is reported
    either way)."""
    score_max_tokens: int = 4096
    """Padded tokens (rows x length) per teacher-forced forward pass (the logits of one pass
    hold this many x vocabulary values, in the model's dtype; log-prob and entropy are taken
    a chunk of tokens at a time)."""
    scoring_backend: Literal["auto", "hf", "megatron"] = "auto"
    """Teacher-forced scoring (KL, entropy, drift): "hf" = transformers, the whole model in
    one process; "megatron" = megatron-core at parallel.* TP/PP with the data-parallel ranks
    splitting the samples (needs eval.models[].checkpoint); "auto" = megatron when launched
    with more than one process or when every model has a checkpoint, else hf."""
    cpu_threads: int = 0
    """torch CPU threads for generation and scoring; 0 = auto: 1 when they run on the CPU (the
    tiny demo/test models, where more threads on a shared machine are several times slower),
    else torch's default. Set N for a larger model on an idle CPU machine."""
    cpu_workers: int = 1
    """Processes that sample and score the non-base models side by side when generation and
    scoring run on the CPU (hf engine, hf scoring), each with ``cpu_threads`` threads; the
    table is identical to one process's (every model is sampled with the same seed). 1 = all
    in this process; ignored on GPUs."""


@dataclass(kw_only=True)
class RoundRunConfig:
    """One Stage-1 run of a round (e.g. the pg teacher, or the unlearned policy U)."""

    name: str = "teacher"
    """Name of the run (its output folder is ``s1_<name>``)."""
    overrides: list[str] = field(default_factory=list)
    """``a.b=c`` overrides applied on top of the recipe for this run (e.g.
    ``stage1.loss=unlearned``)."""


@dataclass(kw_only=True)
class RoundTeacherConfig:
    """A model of the teacher cache, taken from a Stage-1 run."""

    name: str = "teacher0"
    """Key in the cache (what stage2.teachers[].model refers to)."""
    run: str = "teacher"
    """The Stage-1 run that produced it."""
    epoch: Optional[int] = None
    """Use the snapshot after this epoch (it must be in the run's stage1.save_epochs); null =
    final."""
    topk: bool = True
    """Cache its top-k (teachers) or only its sampled-token log-probs (U)."""
    evaluate: bool = True
    """Include it in the round's evaluation table."""


@dataclass(kw_only=True)
class RoundStudentConfig:
    """One Stage-2 student of a round."""

    name: str = "student"
    """Name of the student (its output folder is ``s2_<name>``)."""
    overrides: list[str] = field(default_factory=list)
    """``a.b=c`` overrides for this Stage-2 run (e.g. ``stage2.teachers=[...]``)."""


@dataclass(kw_only=True)
class RoundConfig:
    """`erpd round`: rollouts -> Stage 1 -> convert -> cache -> Stage 2 -> convert -> evaluate."""

    rounds: int = 1
    """Rounds to run; each round's ``next_policy`` student becomes the next round's pi_r."""
    base_hf: Optional[str] = None
    """HF checkpoint of the round-0 policy (converted to Megatron for training)."""
    stage1_runs: list[RoundRunConfig] = field(default_factory=lambda: [RoundRunConfig()])
    """Stage-1 runs of each round."""
    teachers: list[RoundTeacherConfig] = field(default_factory=lambda: [RoundTeacherConfig()])
    """Models cached for Stage 2 (snapshots or finals of the Stage-1 runs)."""
    students: list[RoundStudentConfig] = field(default_factory=lambda: [RoundStudentConfig()])
    """Stage-2 students of each round."""
    next_policy: Optional[str] = None
    """Student that becomes the next round's policy; null = the first."""
    nproc_per_node: int = 1
    """Processes per training launch (torchrun) on this node."""
    evaluate: bool = True
    """Evaluate base, teachers and students at the end of each round."""


@dataclass(kw_only=True)
class DemoConfig:
    """The embedded CPU demo's task and base (erpd_megatron/pipeline/demo.py)."""

    train_problems: int = 3000
    """Arithmetic problems in the train split (supervised data of the base, and rollout prompts)."""
    heldout_problems: int = 200
    """Problems in the held-out split (evaluation)."""
    validation_problems: int = 200
    """Problems in the validation split (disjoint from train and test): every choice of a
    setting is made on it (docs/demo_protocol.md); ``heldout_problems`` sizes the test split."""
    eval_split: Literal["validation", "test"] = "test"
    """Split of every evaluation of the run (Stage-1 curves and the table): ``validation`` for
    runs that choose settings, ``test`` for the reported run."""
    pretrain_epochs: int = 8
    """Supervised epochs of the base trained from scratch."""
    pretrain_lr: float = 3e-3
    """Peak learning rate of the supervised training (cosine decay)."""
    unboxed_fraction: float = 0.0
    """Fraction of the base's supervised solutions that end with the plain answer instead of
    ``\\boxed{}`` (scored 0 by the verifier): a base that follows the answer format only part
    of the time, as many real base models do."""
