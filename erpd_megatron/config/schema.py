"""The typed configuration of erpd_megatron: one dataclass per component, one root.

Every field has a docstring (the string literal under it); :mod:`erpd_megatron.config.loader`
reads YAML into these classes strictly (an unknown key is an error naming the closest valid
one) and :mod:`erpd_megatron.config.validate` checks cross-field constraints such as the
parallel layout. Field docstrings are collected by :func:`field_docs` for ``erpd config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from erpd_megatron.config.schema_round import (
    DemoConfig,
    EvalConfig,
    EvalModelConfig,
    RolloutConfig,
    RoundConfig,
    RoundRunConfig,
    RoundStudentConfig,
    RoundTeacherConfig,
)


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (Llama, Qwen2/2.5, Qwen3 families)."""

    family: Literal["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe"] = "llama"
    """Model family; selects the HF <-> Megatron tensor map and HF config class (qwen3_moe,
    qwen2_moe: mixture-of-experts, set num_experts)."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 128
    """Width of the gated MLP (SwiGLU) inner projection."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: int = 2
    """Number of key/value heads (GQA groups); equal to num_attention_heads for MHA."""
    kv_channels: Optional[int] = None
    """Head dimension; null means hidden_size / num_attention_heads."""
    vocab_size: int = 256
    """Real vocabulary size of the tokenizer / HF embedding (before padding)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this times the TP size (Megatron convention).
    Padded rows are masked out of every softmax, top-k and KL."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is built for (prompt + response)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: Optional[Literal["llama3"]] = None
    """RoPE scaling type; "llama3" for Llama-3.1+ checkpoints."""
    rope_scaling_factor: float = 8.0
    """Scaling factor for rope_scaling="llama3"."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2/2.5: true)."""
    qk_layernorm: bool = False
    """RMSNorm on per-head queries and keys (Qwen3: true)."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_method_std: float = 0.02
    """Std of the normal init of freshly initialised weights (tiny models trained from scratch)."""
    num_experts: Optional[int] = None
    """Number of routed MoE experts per sparse layer (HF ``num_experts``); null for dense models."""
    moe_router_topk: int = 2
    """Experts each token is routed to (HF ``num_experts_per_tok``)."""
    moe_ffn_hidden_size: Optional[int] = None
    """Inner width of one routed expert's SwiGLU (HF ``moe_intermediate_size``); null means
    ffn_hidden_size. Dense layers (see decoder_sparse_step, mlp_only_layers) use ffn_hidden_size."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing probabilities to sum to 1 (HF ``norm_topk_prob``). True is
    megatron's top-k-then-softmax (``moe_router_pre_softmax=False``); false keeps the softmax over
    all experts (``moe_router_pre_softmax=True``)."""
    decoder_sparse_step: int = 1
    """Layer i (0-based) is an MoE layer when (i + 1) % decoder_sparse_step == 0 and i is not in
    mlp_only_layers (HF's rule); the others are dense MLP layers."""
    mlp_only_layers: list[int] = field(default_factory=list)
    """0-based layer indices that use a dense MLP even though decoder_sparse_step makes them
    sparse."""
    moe_aux_loss_coeff: float = 0.0
    """Coefficient of the router load-balancing loss (megatron "aux_loss", per micro-batch; HF
    ``router_aux_loss_coef``, which transformers applies only when training with
    output_router_logits); 0 disables it."""
    moe_z_loss_coeff: Optional[float] = None
    """Coefficient of the router z-loss (ST-MoE); null disables it."""
    shared_expert_intermediate_size: Optional[int] = None
    """Width of the shared expert that every token passes through (Qwen2-MoE); null: none."""
    shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(gate(x)) (Qwen2-MoE: true), megatron's
    ``moe_shared_expert_gate``."""
    moe_expert_capacity_factor: Optional[float] = None
    """Token capacity of each expert as a multiple of its even share (megatron
    ``moe_expert_capacity_factor``; tokens over it are dropped and their share logged as
    ``moe/l<i>/dropped_frac``); null: no capacity, no dropping (HF's behaviour)."""
    moe_router_replay: Optional[Literal["pi_r"]] = None
    """``pi_r``: record pi_r's top-k experts of every token in the anchor scoring pass and replay
    them in the Stage-1/Stage-2 forwards (megatron-core's RouterReplay, so routers cannot flip
    between pi_r and the policy; models/router_replay.py); null: every forward routes itself.
    Either way ``moe/l<i>/routing_diff`` logs the share of tokens routed unlike pi_r."""


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model and data are laid out over ranks."""

    tensor_model_parallel_size: int = 1
    """TP size: shards attention heads, MLP width and vocabulary."""
    pipeline_model_parallel_size: int = 1
    """PP size: splits the layers into stages (1F1B schedule)."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved pipeline: model chunks per pipeline rank (null = plain 1F1B). The bubble
    shrinks by this factor; num_layers must divide by PP x VPP, and each step's micro-batches
    are padded (zero-loss dummies) to a multiple of PP, as megatron's interleaved schedule
    requires. Checkpoints load across VPP settings (layers are stored by global number)."""
    expert_model_parallel_size: int = 1
    """EP size for MoE models: EP rank e holds experts [e*E/EP, (e+1)*E/EP)."""
    expert_tensor_parallel_size: int = 1
    """TP size inside each expert (ETP). megatron needs world % (ETP * EP * PP) == 0; 1 keeps
    experts whole (the Qwen3-MoE recipes of Megatron-Bridge use 1)."""
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach their experts' EP ranks. allgather is refused at EP or TP > 1: megatron
    cannot combine it with the per-rank variable-length micro-batches the engines run."""
    moe_grouped_gemm: Optional[bool] = None
    """Run a rank's local experts as one grouped GEMM (Transformer Engine); null = on with TE on
    a GPU, off otherwise (the local spec's SequentialMLP)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: norms, dropout and residuals on 1/TP of the sequence
    (activations /TP). Sequences are padded to a multiple of TP. Runs on CPU through the
    harness (torch norms marked as TE marks its own)."""
    context_parallel_size: int = 1
    """CP size: every sequence is split over this many ranks (megatron's load-balanced 2 x CP
    chunks; attention exchanges K/V between them), so activations per GPU shrink by CP.
    Needs Transformer Engine; packed sequences are aligned to 2 x CP, unpacked rows padded to
    a multiple of 2 x CP. Gradients reduce over DP x CP. Not with stage1.loss=mse (its
    per-sequence square would need the split sums gathered first)."""
    recompute_granularity: Optional[Literal["selective", "full"]] = None
    """Activation recomputation (megatron ``TransformerConfig.recompute_granularity``): null
    keeps every activation; selective recomputes the core attention (the s^2 part without
    flash attention); full keeps only each recomputed layer's input."""
    recompute_method: Optional[Literal["uniform", "block"]] = None
    """With full recompute: uniform recomputes every layer in groups of recompute_num_layers;
    block recomputes the first recompute_num_layers layers of each pipeline stage."""
    recompute_num_layers: Optional[int] = None
    """Layers per recompute group (uniform) or recomputed layers per stage (block); full only."""
    use_distributed_optimizer: bool = True
    """Shard optimizer states over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the DP gradient all-reduce with the backward pass."""
    num_nodes: int = 1
    """Nodes the recipe targets (used by `erpd dryrun` and the Slurm scripts)."""
    gpus_per_node: int = 8
    """GPUs per node the recipe targets (used by `erpd dryrun`)."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU, for the dry-run fit check."""
    distributed_timeout_minutes: int = 30
    """Collective timeout (torch.distributed and megatron's groups): a rank stuck this long in a
    collective aborts instead of hanging (raise it for very slow checkpoint loads or saves)."""


@dataclass(kw_only=True)
class PrecisionConfig:
    """Numerics and kernels."""

    params_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Parameter/compute dtype; auto = bf16 on GPU, fp32 on CPU."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation; auto = Transformer Engine when importable on a GPU, else local."""
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 format for Transformer Engine GEMMs; null disables FP8. Requires Transformer Engine."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """Transformer Engine FP8 scaling recipe."""
    fp8_margin: int = 0
    """Margin for the FP8 scaling factor."""
    fp8_amax_history_len: int = 1024
    """Length of the amax history window (delayed scaling)."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """How amax is computed from its history (delayed scaling)."""


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW with warmup and decay, through megatron-core's optimizer."""

    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the decay."""
    lr_warmup_steps: int = 0
    """Linear warmup steps."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warmup."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global grad-norm clip; 0 disables."""
    max_nonfinite_steps: int = 3
    """Abort (exit code 3) after this many consecutive steps with a non-finite loss or gradient;
    such steps are skipped and counted, and non-finite weights are never saved."""


@dataclass(kw_only=True)
class DataConfig:
    """Training data: the fixed rollout set of the round and how it is batched."""

    rollout_dir: Optional[str] = None
    """Directory of rollout Parquet shards (with manifest.json) that Stage 1/2 train on."""
    global_batch_size: int = 64
    """Sequences per optimizer step, over all data-parallel ranks."""
    max_tokens_per_microbatch: int = 4096
    """Token budget of one micro-batch (padded tokens counted); sequences are bucketed by length."""
    packing: bool = False
    """Sequence packing: each micro-batch is ONE row of several sequences, filled up to
    max_tokens_per_microbatch by first-fit-decreasing (almost no padding). Attention stays
    within each sequence: THD with cu_seqlens on Transformer Engine, a block-diagonal causal
    mask on the local spec; each sequence has its own position ids. Same losses, gradients
    and caches as unpacked batching (up to rounding)."""
    max_seq_length: Optional[int] = None
    """Prompt + response longer than this is an error naming the sample (no silent truncation);
    null = model.max_position_embeddings."""
    advantage_std_normalize: bool = False
    """Divide the group-centred advantage by the group reward std (GRPO style)."""
    shuffle_seed: int = 1234
    """Seed of the deterministic per-epoch shuffle."""
    drop_zero_advantage_groups: bool = False
    """Drop groups whose rewards are all equal (no policy-gradient signal)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where weights come from and go to."""

    load: Optional[str] = None
    """Initial weights: a Megatron checkpoint dir (from tools/convert_checkpoint.py) or an HF
    dir."""
    save: Optional[str] = None
    """Directory for checkpoints of this run (iter_XXXXXXX subdirs and a `latest` file)."""
    save_interval: int = 0
    """Save every N optimizer steps (0: only at the end and on signals)."""
    keep_last: int = 2
    """Number of periodic checkpoints to keep (epoch snapshots and the final one are kept)."""
    resume: Literal["auto", "never", "must"] = "auto"
    """auto: resume from `save` when it has a checkpoint; must: fail when it has none."""
    exit_code_on_signal: int = 17
    """Exit code after a SIGTERM/SIGUSR1 checkpoint, telling the launcher to requeue."""
    optimizer_sharding: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """Distributed-optimizer state layout on disk: dp_reshardable (fast; resume at the same TP/PP)
    or fully_reshardable (slower; resume at any TP/PP/DP)."""


@dataclass(kw_only=True)
class LoggingConfig:
    """Metrics sinks."""

    log_interval: int = 1
    """Log step metrics every N steps."""
    wandb_project: Optional[str] = None
    """wandb project; null disables wandb."""
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when WANDB_API_KEY is set, offline otherwise."""
    run_name: Optional[str] = None
    """Run name for wandb and the metrics file; null = the config's name."""
    wandb_group: Optional[str] = None
    """wandb group of the run (`erpd study` sets it to the study's name)."""
    progress_bar: bool = True
    """Show a progress bar with ETA on rank 0."""


@dataclass(kw_only=True)
class Stage1Config:
    """Stage 1: weakly constrained multi-epoch optimisation on the fixed rollouts."""

    loss: Literal["pg", "sapo", "ce", "mse", "unlearned"] = "pg"
    """Stage-1 loss (see docs/method.md); unlearned negates the advantage of `unlearned_base`."""
    unlearned_base: Literal["pg", "sapo", "mse"] = "pg"
    """The loss whose advantage is negated when loss = unlearned."""
    epochs: int = 4
    """Passes over the fixed data (E1)."""
    eps_low: Optional[float] = 0.2
    """Lower ratio clip of pg (1 - eps_low); null = no lower clip."""
    eps_high: Optional[float] = 0.28
    """Upper ratio clip of pg (1 + eps_high); null = no upper clip."""
    anchor: Literal["data", "epoch"] = "data"
    """Ratio anchor: the data policy pi_r, or the policy at each epoch start (re-scored)."""
    sapo_tau_pos: float = 1.0
    """SAPO temperature for positive advantages."""
    sapo_tau_neg: float = 1.05
    """SAPO temperature for negative advantages."""
    mse_beta: float = 1.0
    """Mirror-descent beta of the mse loss: target mean log-ratio is A / beta."""
    kl_coef: float = 0.0
    """Coefficient of the k3 KL-to-pi_r penalty (0 disables)."""
    save_epochs: list[int] = field(default_factory=list)
    """Keep a teacher snapshot after these epochs (the final epoch is always kept)."""
    eval_every_epochs: int = 0
    """Held-out accuracy through the rollout engine every N epochs (0 disables)."""
    eval_async: bool = False
    """Let the held-out evaluation child run while training goes on (at most one at a time):
    its result is logged with the step and epoch it evaluated, and waited for before the next
    evaluation, every resumable checkpoint and the end (the metrics file holds the same records
    as with false, the late one further down). For CPU runs whose small models leave a core
    idle (the demo); on GPUs the child would compete with the trainer for the GPU."""
    force: bool = False
    """Train even when no rollout group gives the loss a gradient (all-0 / all-1 groups for
    pg, sapo, mse; no reward-1 sample for ce); otherwise Stage 1 refuses (`--force`)."""


@dataclass(kw_only=True)
class TeacherSignalConfig:
    """One teacher's contribution to the Stage-2 signal."""

    model: str = "teacher0"
    """Name of the cached model supplying the signal (a key of the teacher cache)."""
    signal: Literal["topk_kl", "logratio", "contrast", "gated"] = "topk_kl"
    """How the per-token signal is built (docs/method.md, Stage 2)."""
    weight: float = 1.0
    """Weight of this teacher in the weighted sum."""
    lam: float = 1.0
    """Scale `lambda` of advantage-style signals."""
    clip: float = 1.0
    """Clip `c` of advantage-style signals to [-c, c]."""
    alpha: float = 1.0
    """topk_kl: geometric-mixture exponent (<1 trust region, >1 extrapolation); gated add-form
    weight."""
    contrast_model: str = "unlearned"
    """contrast: the second cached model whose log-prob is subtracted."""
    gate_mode: Literal["sign", "add"] = "sign"
    """gated: keep s where sign(s)==sign(A) ('sign') or use A + alpha*s ('add')."""


@dataclass(kw_only=True)
class Stage2Config:
    """Stage 2: trust-region distillation of cached teacher signals into pi_r."""

    teachers: list[TeacherSignalConfig] = field(default_factory=lambda: [TeacherSignalConfig()])
    """Signals to combine (weighted sum)."""
    cache_dir: Optional[str] = None
    """Teacher cache written by tools/cache_teacher_logprobs.py."""
    epochs: int = 2
    """Passes over the fixed data (E2)."""
    eps: float = 0.2
    """Ratio clip [1-eps, 1+eps] against pi_r."""
    kl_coef: float = 0.0
    """Coefficient of the k3 KL-to-pi_r penalty."""
    c_out: Optional[float] = None
    """Mask tokens whose |signal| exceeds this (null: no outlier mask)."""
    kl_budget: Optional[float] = None
    """Stop when the mean sequence KL(pi_r || pi_theta) on the data exceeds this (nats); keep the
    last checkpoint inside the budget. null: no budget."""


@dataclass(kw_only=True)
class CacheModelConfig:
    """A model scored into the teacher cache."""

    name: str = "teacher0"
    """Key of the model in the cache (referenced by stage2.teachers[].model)."""
    checkpoint: str = ""
    """Megatron checkpoint directory of the model."""
    topk: bool = True
    """Store this model's top-k (teachers); false stores only sampled-token log-probs (e.g. U)."""


@dataclass(kw_only=True)
class CacheConfig:
    """The teacher cache: what is scored and how it is stored."""

    dir: Optional[str] = None
    """Output directory of the cache."""
    models: list[CacheModelConfig] = field(default_factory=list)
    """Teachers (and U) to score; pi_r (checkpoint.load) is always scored as `base`."""
    topk: int = 64
    """Top-k token ids and log-probs stored per token per teacher."""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """On-disk dtype of log-prob values."""
    max_shard_bytes: int = 256 * 1024 * 1024
    """Upper bound on the size of one shard file."""


@dataclass(kw_only=True)
class Config:
    """The root: one recipe = model + parallel layout + algorithm + I/O."""

    name: str = "erpd"
    """Name of the recipe / run."""
    seed: int = 1234
    """Global seed (model init, dropout, data order)."""
    output_dir: str = "runs/erpd"
    """Root of this run's outputs (metrics, checkpoints) unless a component overrides it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numerics."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and LR schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data and batching."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint I/O."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    """Stage 1."""
    stage2: Stage2Config = field(default_factory=Stage2Config)
    """Stage 2."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Teacher cache."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout generation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    round: RoundConfig = field(default_factory=RoundConfig)
    """A whole ERPD round."""
    demo: DemoConfig = field(default_factory=DemoConfig)
    """The embedded demo (ignored by other commands)."""


__all__ = [
    "CacheConfig",
    "CacheModelConfig",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "DemoConfig",
    "EvalConfig",
    "EvalModelConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RolloutConfig",
    "RoundConfig",
    "RoundRunConfig",
    "RoundStudentConfig",
    "RoundTeacherConfig",
    "Stage1Config",
    "Stage2Config",
    "TeacherSignalConfig",
]
