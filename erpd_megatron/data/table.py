"""The fixed rollout set as the trainers see it: a checked :class:`SampleTable`.

Reads the rollout Parquet (:class:`~erpd_megatron.data.rollouts.RolloutSet`), checks it
against the model (token ids inside the vocabulary, lengths inside ``data.max_seq_length``)
and computes the group advantages. Errors name the directory and the sample.
"""

from __future__ import annotations

import numpy as np

from erpd_megatron.config.schema import Config
from erpd_megatron.data.batching import SampleTable, group_advantages
from erpd_megatron.data.rollouts import RolloutDataError, RolloutSet
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

COLUMNS = [
    "sample_id",
    "group_index",
    "prompt_token_ids",
    "response_token_ids",
    "reward",
    "engine_logprobs",
]


def load_sample_table(cfg: Config) -> tuple[SampleTable, str]:
    """The rollout set of ``cfg.data.rollout_dir`` as a SampleTable, and its fingerprint."""
    directory = cfg.data.rollout_dir
    rs = RolloutSet.open(directory)
    cols = rs.load(COLUMNS)
    n = len(cols["sample_id"])
    if n == 0:
        raise RolloutDataError(f"{directory}: the rollout set is empty")
    table = SampleTable(
        sample_ids=np.asarray(cols["sample_id"], np.int64),
        group_ids=np.asarray(cols["group_index"], np.int64),
        prompt_ids=cols["prompt_token_ids"],
        response_ids=cols["response_token_ids"],
        rewards=np.asarray(cols["reward"], np.float32),
        engine_logprobs=cols["engine_logprobs"],
    )
    check_table(table, cfg, str(directory))
    table.advantages = group_advantages(
        table.rewards, table.group_ids, std_normalize=cfg.data.advantage_std_normalize
    )
    if cfg.data.drop_zero_advantage_groups:
        keep = _groups_with_signal(table)
        log.info("data.drop_zero_advantage_groups: keeping %d of %d samples", int(keep.sum()), n)
        table = table.select(np.nonzero(keep)[0])
    empty = [int(s) for s, r in zip(table.sample_ids, table.response_ids) if len(r) == 0]
    if empty:
        log.warning(
            "%s: %d samples have empty responses (e.g. sample %d); they carry no tokens",
            directory,
            len(empty),
            empty[0],
        )
    return table, rs.fingerprint


def check_table(table: SampleTable, cfg: Config, where: str) -> None:
    """Token ids must be inside the model's vocabulary; sequences inside the length limit."""
    vocab = cfg.model.vocab_size
    limit = cfg.data.max_seq_length or cfg.model.max_position_embeddings
    for i in range(len(table)):
        p, r = table.prompt_ids[i], table.response_ids[i]
        top = max(int(p.max()) if len(p) else -1, int(r.max()) if len(r) else -1)
        low = min(int(p.min()) if len(p) else 0, int(r.min()) if len(r) else 0)
        if top >= vocab or low < 0:
            raise RolloutDataError(
                f"{where}: sample {int(table.sample_ids[i])} has token id "
                f"{top if top >= vocab else low} outside the model vocabulary [0, {vocab}) "
                f"(model.vocab_size={vocab}); the rollouts were made with another tokenizer, or "
                "the model config is wrong"
            )
        if len(p) == 0:
            raise RolloutDataError(
                f"{where}: sample {int(table.sample_ids[i])} has an empty prompt"
            )
        if len(p) + len(r) > limit:
            raise RolloutDataError(
                f"{where}: sample {int(table.sample_ids[i])} has {len(p) + len(r)} tokens, more "
                f"than data.max_seq_length={limit}; raise it (and model.max_position_embeddings) "
                "or filter the data"
            )


def _groups_with_signal(table: SampleTable) -> np.ndarray:
    uniq, inv = np.unique(table.group_ids, return_inverse=True)
    lo = np.full(len(uniq), np.inf)
    hi = np.full(len(uniq), -np.inf)
    np.minimum.at(lo, inv, table.rewards)
    np.maximum.at(hi, inv, table.rewards)
    return (hi > lo)[inv]
