"""``lesft report DIR``: tables and figures of a sweep directory -> ``DIR/report.md`` + ``DIR/figures/*.png``.

Reads ``DIR/sweep.json`` (the grid keys and their order; without it every sub-directory holding a run is
read and the keys whose values differ between runs are used) and, for every run, ``summary.json``,
``metrics.jsonl``, ``eval/eval.json``, ``config.yaml`` / ``config.input.yaml`` and ``error.json``.

Tables:

* **Accuracy**: one row per method (plus, for points given in the spec's ``runs``, the keys they
  set, e.g. ``lesft (aggregate_every=0)``), one column per combination of the other grid keys that
  vary (seed excluded). A cell is ``acc% [lo, hi] (n=N)``: the run's Wilson 95% interval over its N
  questions. With several seeds the cell is the mean accuracy over the seeds and the mean of the seeds'
  bounds (every seed answers the same questions, so pooling them would overstate N) and
  the seeds' standard deviation is shown. The best cell of each column is in bold (ties too; with one
  row, the best cell of the row). A run without an evaluation leaves its cell empty, never 0. A
  ``base`` run (the untuned model) appears in every column whose keys it does not set.
* **Overhead** per method (and column): peak memory per side, total MB per direction over the whole
  run (MB = 2^20 bytes), client / server busy seconds per epoch, where epochs = rounds x batch_size x
  grad_accum / (largest client's samples), i.e. passes over the largest client's data (per round when
  the config is missing), and rows/step: the training rows one optimizer step of the LM head averages
  (split methods: the server's, over every client of the round; so the same epochs are fewer, larger
  steps than ``centralized``'s).
* **LESFT token classes**: the share and mean weight of salient / sub-salient / irrelevant target
  tokens in the last round (metrics.jsonl ``token_classes``), averaged over runs.
* **Answers**: per cell, the shares of correct answers, arithmetic slips, reasoning errors and answers
  without an equation (:mod:`lesft.errors`), with the answers' length and shape.

Figures (when the key varies): with ``--baseline``, a forest plot of each row's paired difference to
it (interval, seeds, p); accuracy vs split point (client_layers), vs samples per client (per_client),
vs number of clients (clients); ablation bars for ``paths`` and ``lesft.weighting`` (each bar holds
only runs that differ in that key: a run that also sets another key is its own bar group);
training-loss curves per method; accuracy vs total bytes communicated.

Malformed or missing files are listed in a "Problems" section (and on stderr); the report is still
written. A "Reproducibility" section lists versions, commit, device, dtype, seeds and wall times as
the runs recorded them.

The code, by job: ``runs`` (reading and checking a sweep directory), ``tables`` (rows and columns, the tables,
the CSV), ``figures`` (matplotlib), ``markdown`` (``write_report``, the prose, and the ``lesft report`` command).
"""

from lesft.report.markdown import add_arguments, command, write_report
from lesft.report.tables import ReportError

__all__ = ["write_report", "add_arguments", "command", "ReportError"]
