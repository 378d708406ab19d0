"""Sweeps: many training runs (and their evaluations) from one YAML spec, resumable and fault-tolerant.

``lesft sweep SPEC.yaml --out DIR [--dry-run] [--jobs N]``.

Spec format
-----------

.. code-block:: yaml

    name: fig3-split-point
    description: free text (optional)
    base: {model: smollm2-135m, data: synthetic, samples: 64, clients: 4, epochs: 1}
    grid:                        # cartesian product of these values
      method: [sl, lesft]
      client_layers: ["1/2", "1/4"]
      seed: [0, 1]
    runs:                        # optional extra points, each a dict of overrides of `base`
      - {method: base}           # the untuned model (no training, evaluation only)
      - {method: lesft, aggregate_every: 0, seed: [0, 1]}   # a list value expands within this entry
    eval: {split: test, limit: 100, max_new_tokens: 96}   # optional: evaluate every finished run
    validation: {limit: 50}      # optional: and on the validation split (eval's settings, these on top)

* ``base``: :class:`lesft.config.TrainConfig` fields, nested (``lora: {r: 8}``) or dotted
  (``lora.r: 8``). ``dataset`` is accepted for ``data``. ``out``, ``resume`` and ``overwrite`` belong
  to the sweep and are refused here.
* ``grid``: ``key: [values]``; keys are TrainConfig fields, dotted for nested ones
  (``lesft.weighting``, ``lora.r``). Every combination is one run.
* ``runs``: extra points, each a dict of overrides of ``base`` (not crossed with the grid). A list
  value expands into one run per element (a small grid inside that entry); for a list-typed field
  (``lora.target_modules``, ``synthetic.operations``) a plain list is the value itself and a list of
  lists expands.
* ``eval``: :class:`lesft.evaluate.EvalConfig` fields (dataset, split, limit, batch_size,
  max_new_tokens, mode, seed, ...). Without ``dataset`` each run is evaluated on its own training
  benchmark (``data``), on the ``split`` given (default ``test``; CommonsenseQA uses
  ``validation``). The evaluation ``seed`` is the same for every run, so every run answers the same
  questions. Runs without an aggregation step (``sl``, ``splitfrozen``) are evaluated with client
  0's adapter (``RUN/adapter``). Leave ``eval`` out to train only.
* ``validation``: a second evaluation of every finished run, into ``RUN/eval-validation``: ``eval``'s
  fields with ``split: validation``, then these on top (``{}`` takes them as they are). Choose settings
  on it (``lesft report DIR --eval eval-validation``) and confirm on ``eval``. Added to a finished sweep,
  it evaluates each run on the validation split only: nothing is retrained or evaluated again.
* ``method: base`` (in the grid or in ``runs``) is the untuned model: nothing is trained, the model
  is evaluated without an adapter (needs ``eval``). Its run name keeps only the keys that can change
  an untuned model's answers (method, model, data, data_dir, rationale, chat_template,
  synthetic.*), so one base run serves every seed / split point / client count of the grid, and the
  report shows it in every column it does not pin.

Run directories
---------------

One directory per point, ``DIR/<name>``, the name made of the point's own keys and values in spec
order, filesystem-safe and stable: ``method=lesft__client_layers=1-4__seed=0`` (``/`` and ``=`` in a
value become ``-``, any other unsafe character ``_``; two points that would get the same name get a
short hash of their values appended, and very long names are shortened the same way). A directory
holds what ``lesft train`` writes (config.yaml, metrics.jsonl, summary.json, adapter/, checkpoint/)
plus ``config.input.yaml`` (the full TrainConfig of the point: ``lesft train --config
RUN/config.input.yaml`` reruns it by hand), ``sweep_point.json`` (name, overrides, evaluations),
``eval/`` (eval.json, predictions.jsonl; ``eval-validation/`` likewise with ``validation``), ``error.json``
when it failed, ``log.txt`` with ``--jobs``.

Status of a run, checked from its files on every call:

* ``done``: summary.json (and, for each of ``eval`` and ``validation`` asked, its eval.json made with
  the same settings) exists: skipped.
* ``pending``: nothing yet, or rounds logged before any checkpoint: trained from the start, then
  evaluated.
* ``interrupted``: a checkpoint but no summary: training continues from the checkpoint
  (``resume=True``), ending exactly as an uninterrupted run would. A run in progress reads the same;
  the detail column says how far it got (the checkpoint's round, the rounds logged).
* ``needs-eval``: trained, an evaluation missing or made with other settings: that one is made, only.
* ``failed``: ``error.json`` (type, message, stage, traceback tail, attempts): retried on the next
  call, from its checkpoint when it has one.
* ``stale``: the directory was made with another configuration (``config.input.yaml`` differs from
  the spec now): refused, never overwritten. Delete the directory (or use another ``--out``) to redo it.

A failed run never stops the sweep. ``DIR/sweep.json`` holds the spec, each run's overrides, status,
what this call did and its wall time, plus the sweep's own overhead (wall time not spent inside runs).

Execution
---------

By default runs go one after another in this process (the cheapest: torch and transformers are
imported once, a finished model is freed before the next is loaded). ``--jobs N`` runs N child
processes at a time (``python -m lesft.sweep --one RUN``, output in ``RUN/log.txt``). Memory caveat:
every child loads its own copy of the model and data, so peak memory is about N times one run's
(on one GPU, N CUDA contexts of ~0.5 GB each plus N models and activations share its memory), each
child pays the torch/transformers import (seconds), and the CPU threads are split between the
children (``OMP_NUM_THREADS`` = cores / N unless set). Measured memory and latency per run
(summary.json) are also perturbed by the neighbours: use ``--jobs 1`` for overhead tables.

The code, by job: ``spec`` (reading, checking and expanding a spec; run names), ``status`` (what a run
directory says), ``point`` (running one point, here or in a child process), and here the orchestration and
the command.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence


from lesft.plugins import load_plugins
from lesft.provenance import git_commit
from lesft.sweep.point import InFlight, _prepare, _spawn, _write_json, execute
from lesft.sweep.spec import BASE_METHOD, RUNNABLE, _flatten, _norm_key, evaluations, expand, load_spec
from lesft.sweep.status import Point, _points, _read_json, _status

__all__ = ["BASE_METHOD", "evaluations", "expand", "load_spec", "run_sweep", "execute", "add_arguments", "command", "main"]


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------

_ACTIONS = {"done": "skip", "pending": "run", "interrupted": "resume", "needs-eval": "eval", "failed": "retry",
            "stale": "refuse"}


def _record(p: Point, status: str, detail: str, action: str, wall: float | None = None) -> dict[str, Any]:
    return {"name": p.name, "dir": str(p.dir), "overrides": p.overrides, "method": p.method, "status": status,
            "action": action, "wall_s": wall, "detail": detail}


def _sweep_json(spec: dict[str, Any], spec_path: str, records: list[dict[str, Any]], t0: float,
                env: dict[str, Any]) -> dict[str, Any]:
    grid = spec.get("grid") or {}
    run_keys: list[str] = []
    for i, entry in enumerate(spec.get("runs") or []):
        for k in _flatten(entry, f"runs[{i}]"):
            if k not in run_keys:
                run_keys.append(k)
    wall = time.perf_counter() - t0
    inside = sum(r["wall_s"] or 0.0 for r in records if r["action"] not in ("skip", "refuse"))
    return {
        "name": spec.get("name"),
        "spec_path": str(spec_path),
        "spec": spec,
        "keys": {"grid": [_norm_key(k, "grid") for k in grid], "runs": run_keys},
        "values": {_norm_key(k, "grid"): v for k, v in grid.items()},
        "environment": env,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "counts": {s: sum(r["status"] == s for r in records) for s in sorted({r["status"] for r in records})},
        "sweep_wall_s": wall,
        "runs_wall_s": inside,
        "overhead_s": max(0.0, wall - inside),
        "runs": records,
    }


def run_sweep(spec_path: str, out: str, dry_run: bool = False, jobs: int = 1) -> list[dict]:
    """Run (or, with ``dry_run``, list) every point of the spec under ``out``; return one record per run:
    ``name, dir, overrides, method, status`` (after this call), ``action`` (skip, run, resume, eval,
    retry, refuse; with ``dry_run`` what would be done), ``wall_s``, ``detail`` (error or staleness)."""
    t0 = time.perf_counter()
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    spec = load_spec(spec_path)
    root = Path(out)
    points = _points(spec, root)
    states = [_status(p) for p in points]
    records = [_record(p, s, det, _ACTIONS[s]) for p, (s, det) in zip(points, states)]
    name = spec.get("name") or Path(spec_path).stem
    if dry_run:
        _print_table(name, root, records)
        return records

    root.mkdir(parents=True, exist_ok=True)
    env = {"git_commit": git_commit(), "python": sys.version.split()[0], "argv": sys.argv,
           "platform": sys.platform, "jobs": jobs}
    lock = threading.Lock()

    def save() -> None:
        with lock:
            _write_json(root / "sweep.json", _sweep_json(spec, spec_path, records, t0, env))

    todo = [i for i, (s, _) in enumerate(states) if s in RUNNABLE]
    for r in records:
        if r["status"] == "stale":
            print(f"lesft sweep: refusing {r['name']}: {r['detail']}", file=sys.stderr)
    print(f"sweep {name}: {len(points)} runs in {root}, {len(todo)} to do "
          f"({len(points) - len(todo)} done or refused)", flush=True)
    save()
    counter = itertools.count(1)

    def one(i: int) -> None:
        p = points[i]
        _prepare(p)
        k = next(counter)
        print(f"[{k}/{len(todo)}] {records[i]['action']} {p.name}", flush=True)
        res = execute(p.dir) if jobs == 1 else _spawn(p, max(1, (os.cpu_count() or 1) // jobs), in_flight)
        status, detail = _status(p)
        with lock:
            records[i].update(status=status, detail=detail, wall_s=res["wall_s"])
        if not res["ok"]:
            e = res["error"]
            print(f"  FAILED {p.name} ({e['stage']}): {e['type']}: {e['message'][:300]}", file=sys.stderr, flush=True)
        else:
            print(f"  {status} {p.name} in {res['wall_s']:.1f} s", flush=True)
        save()

    in_flight, signals = InFlight(), 0

    def on_signal(signum: int, frame: Any) -> None:
        """SIGINT, SIGTERM or SIGHUP: passed on to the runs in flight (``--jobs``); the first also stops the sweep."""
        nonlocal signals
        signals += 1
        in_flight.interrupt()
        if signals == 1:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name}; the runs in flight checkpoint")

    # explicit handlers (in the main thread only): a sweep started in the background of a script inherits
    # SIGINT ignored, and SIGTERM or a closed terminal's SIGHUP would end the sweep and leave its children
    # running; a SIGHUP ignored at the start (nohup) stays ignored
    sigs = [signal.SIGINT, signal.SIGTERM] + [s for s in (getattr(signal, "SIGHUP", None),)
                                               if s is not None and signal.getsignal(s) is not signal.SIG_IGN]
    old = {s: signal.signal(s, on_signal) for s in sigs} if threading.current_thread() is threading.main_thread() else {}
    try:
        if jobs == 1:
            for i in todo:
                one(i)
        else:
            pool = ThreadPoolExecutor(max_workers=jobs)
            try:
                list(pool.map(one, todo))
            finally:  # on Ctrl-C: start no further run, wait for the ones in flight to checkpoint
                pool.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt as e:  # the run in flight checkpointed its last finished round (lesft.interrupt)
        from lesft.interrupt import Interrupted

        raise Interrupted(f"sweep {name} stopped{' (' + str(e).split(' Resume with')[0] + ')' if str(e) else ''}. "
                          f"Resume with: lesft sweep {spec_path} --out {out}") from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        save()
    done = sum(r["status"] == "done" for r in records)
    bad = [r for r in records if r["status"] != "done"]
    summary = _read_json(root / "sweep.json") or {}
    wall, over = summary.get("sweep_wall_s", 0.0), summary.get("overhead_s", 0.0)
    print(f"sweep {name}: {done}/{len(records)} done, {len(bad)} not done"
          + (f" ({', '.join(sorted({r['status'] for r in bad}))})" if bad else "")
          + (f"; {wall:.1f} s, sweep overhead {over:.2f} s ({100 * over / wall:.1f}%)"
             if summary.get("runs_wall_s") else f"; nothing to run ({wall:.2f} s)")
          + f" -> {root / 'sweep.json'}", flush=True)
    return records


def _print_table(name: str, root: Path, records: list[dict[str, Any]]) -> None:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"sweep {name}: {len(records)} runs in {root} ("
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")")
    w = max([len(r["status"]) for r in records] + [6])
    print(f"  {'status':<{w}}  {'action':<7} run")
    for r in records:
        print(f"  {r['status']:<{w}}  {r['action']:<7} {r['name']}" + (f"  [{r['detail']}]" if r["detail"] else ""))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``lesft sweep`` (for :mod:`lesft.cli`)."""
    parser.add_argument("spec", help="sweep spec (YAML): name, base, grid, runs, eval (see configs/README.md)")
    parser.add_argument("--out", required=True, help="sweep directory: one sub-directory per run + sweep.json")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="list the runs and their status (done, pending, interrupted, failed, ...) and exit")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each in its own process (default 1: one after another in this "
                             "process). N processes hold N models in memory at once")


def command(args: argparse.Namespace) -> int:
    """``lesft sweep``: 0 when every run is done (or a dry run), 1 when some failed or were refused."""
    records = run_sweep(args.spec, args.out, dry_run=args.dry_run, jobs=args.jobs)
    return 0 if args.dry_run or all(r["status"] == "done" for r in records) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lesft.sweep --one RUN_DIR``: one prepared run, in a child process of ``lesft sweep --jobs N``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["--one"] or len(argv) != 2:
        print("usage: python -m lesft.sweep --one RUN_DIR (a child of `lesft sweep --jobs N`; run sweeps with "
              "`lesft sweep`)", file=sys.stderr)
        return 2
    load_plugins()  # $LESFT_PLUGINS: the parent's --plugin extensions
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the sweep's SIGINT stops an evaluation too
    try:
        return 0 if execute(argv[1])["ok"] else 1
    except KeyboardInterrupt as e:
        print(f"lesft sweep: interrupted: {e}", file=sys.stderr)
        return 130
