"""Held-out evaluation of a round: accuracy, KL to the base, entropy, drift; tables and plots.

Python API (the round orchestration and `erpd evaluate` use these):

* :func:`erpd_megatron.eval.evaluate.evaluate_models` ``(cfg) -> list[dict]``: one row per
  model and held-out set;
* :func:`erpd_megatron.eval.mcore_scoring.score_responses_mcore` ``(engine, prompts, responses)``:
  the teacher-forced scores of ``eval.scoring_backend=megatron`` (sharded, any TP/PP/DP);
* :func:`erpd_megatron.eval.report.write_report` ``(rows, out_dir) -> dict[str, Path]``:
  results.md / .csv / .json and accuracy_vs_kl.png;
* :func:`erpd_megatron.eval.report.format_table` ``(rows) -> str``: the Markdown table;
* :func:`erpd_megatron.eval.curves.plot_training_curves` ``(metrics_files, out_dir) -> list[Path]``:
  one figure of training curves per stage.

Submodules import lazily (nothing heavy happens on ``import erpd_megatron.eval``).
"""
