"""Token math of ERPD.

Pure tensor functions (no Megatron, no torch.distributed): :mod:`.common` (masking, global
token normaliser, metric sums, non-finite guard), :mod:`.kl` (k1/k2/k3, KL penalty),
:mod:`.losses` (Stage-1 losses and their dispatcher), :mod:`.signals` (Stage-2 signals and
the trust-region surrogate). The one module that talks to a process group is
:mod:`.vocab_parallel` (log-prob, entropy, top-k and top-k + tail KL over TP-sharded
logits). Nothing is imported here, so importing a pure module stays pure.
"""
