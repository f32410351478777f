"""Models: ModelConfig -> megatron GPTModel (:mod:`.builder`), HF <-> Megatron tensor and
config maps (:mod:`.hf_maps`, :mod:`.hf_config`), checkpoint I/O (:mod:`.checkpoint`) and
HF <-> mcore conversion (:mod:`.convert`).

Nothing is imported here: megatron-core is imported lazily by the functions that need it.
"""
