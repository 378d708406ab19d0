"""Running one point: training (or resuming) and evaluating it, in this process or in a child process
(``python -m lesft.sweep --one RUN``)."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from lesft.config import TrainConfig
from lesft.typed import from_dict, load_yaml
from lesft.data.registry import BENCHMARKS
from lesft.sweep.spec import BASE_METHOD
from lesft.sweep.status import Point, _evaluated_as, _read_json


# ----------------------------------------------------------------------------------------------
# Running one point
# ----------------------------------------------------------------------------------------------


def _prepare(p: Point) -> None:
    """Write the point's inputs to its directory (what ``--one`` reads back)."""
    p.dir.mkdir(parents=True, exist_ok=True)
    meta = _read_json(p.dir / "sweep_point.json") or {}
    meta.update(name=p.name, overrides=p.overrides, evals=p.evals)
    if p.config_error:
        meta["config_error"] = p.config_error
    else:
        meta.pop("config_error", None)
    _write_json(p.dir / "sweep_point.json", meta)
    if p.config is not None:
        _atomic_write(p.dir / "config.input.yaml", yaml.safe_dump(p.config, sort_keys=False))


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def execute(run_dir: str | Path) -> dict[str, Any]:
    """Train (or continue) and evaluate the point prepared in ``run_dir``; on failure write
    ``run_dir/error.json`` and return ``{"ok": False, ...}``. Never raises (except KeyboardInterrupt)."""
    d = Path(run_dir)
    t0 = time.perf_counter()
    meta = _read_json(d / "sweep_point.json") or {}
    old = _read_json(d / "error.json") or {}
    (d / "error.json").unlink(missing_ok=True)
    stage, action = "config", "run"
    try:
        if meta.get("config_error"):
            raise ValueError(meta["config_error"])
        cfg = from_dict(TrainConfig, load_yaml(d / "config.input.yaml"))
        if cfg.method != BASE_METHOD and not (d / "summary.json").is_file():
            stage = "train"
            from lesft.checkpoint import find_checkpoint
            from lesft.train import train

            ckpt = find_checkpoint(d) is not None
            action = "resume" if ckpt else "run"
            # no checkpoint: whatever a failed attempt left (an empty metrics.jsonl) is replaced
            train(dataclasses.replace(cfg, out=str(d), resume=ckpt, overwrite=not ckpt))
        elif cfg.method != BASE_METHOD:
            action = "eval"
        trained_now = stage == "train"
        for sub, spec in meta.get("evals", {}).items():  # written by _prepare just before
            if not trained_now and _evaluated_as(d, sub, spec, meta):
                continue  # e.g. a validation added to a finished sweep: the test evaluation is not redone
            stage = sub
            _evaluate(d, cfg, spec, sub)
            if sub == "eval":
                meta = _read_json(d / "sweep_point.json") or meta
                meta["evaluated_with"] = spec
                _write_json(d / "sweep_point.json", meta)
        return {"ok": True, "action": action, "wall_s": time.perf_counter() - t0}
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 -- a failed run is recorded, the sweep goes on
        err = {
            "type": type(e).__name__,
            "message": str(e),
            "stage": stage,
            "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__)[-12:])[-4000:],
            "attempts": int(old.get("attempts", 0)) + 1,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_json(d / "error.json", err)
        return {"ok": False, "action": action, "wall_s": time.perf_counter() - t0, "error": err}
    finally:
        _free_memory()


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _evaluate(d: Path, cfg: TrainConfig, spec: dict[str, Any], sub: str = "eval") -> dict[str, Any]:
    """Evaluate run ``d`` (or, for ``method: base``, the untuned model) with EvalConfig fields ``spec``
    into ``d/sub``."""
    from lesft import evaluate as ev  # lazily: only sweeps that evaluate import it

    known = BENCHMARKS
    kw = dict(spec)
    if "dataset" not in kw:
        if cfg.data not in known:
            raise ValueError(f"{sub}: the run trains on {cfg.data!r}, not a benchmark: set eval.dataset in the spec")
        kw["dataset"] = cfg.data
    kw.setdefault("chat_template", cfg.chat_template)
    kw["out"] = str(d / sub)
    ecfg = ev.EvalConfig(**kw)
    if cfg.method != BASE_METHOD:
        return ev.run_eval(ecfg, cfg.model, run_dir=str(d))  # adapter: RUN/adapter
    from lesft.data.synthetic import ArithmeticSpec

    if ecfg.dataset == "synthetic" and cfg.data == "synthetic" and cfg.synthetic != ArithmeticSpec() and not ecfg.file:
        # the same questions as the trained runs (run_eval passes a run's difficulty only with a run_dir)
        from lesft.data.benchmarks import load_benchmark

        rows = load_benchmark("synthetic", ecfg.split, ecfg.data_dir, n=ecfg.limit or None, seed=ecfg.seed,
                              spec=cfg.synthetic)
        lm, tok = ev.load_for_eval(cfg.model, None, ecfg.device)
        meta = {"model": cfg.model, "adapter": None, "run_dir": str(d)}
        return dict(ev.evaluate_rows(lm, tok, rows, "synthetic", ecfg, meta=meta), **meta)
    return ev.run_eval(ecfg, model=cfg.model, adapter=None)


def _signal_cause(signum: int) -> str:
    """Why a child killed by signal ``signum`` died, in words (SIGKILL is what the out-of-memory killer sends)."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"killed by signal {signum}"
    if signum == getattr(signal, "SIGKILL", None):
        return f"killed by {name}: out of memory, or killed by hand"
    if signum in (signal.SIGINT, signal.SIGTERM):
        return f"stopped by {name} before it could checkpoint; the next sweep retries it"
    return f"killed by {name}"


class InFlight:
    """The child processes of the ``--jobs`` runs in flight. Each runs in its own process group, so that a
    Ctrl-C at the terminal reaches the sweep alone; the sweep passes every SIGINT, SIGTERM (or SIGHUP, unless
    ignored as under nohup) it gets on to each child as one SIGINT (the first: finish the round, checkpoint,
    exit; a second: stop at once)."""

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.RLock()  # re-entrant: a second signal may arrive inside interrupt()
        self.stopping = False

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen | None:
        """The started child, or None once the sweep is stopping (no new run starts then)."""
        with self._lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(argv, start_new_session=True, **kw)  # its own process group
            self._procs.add(proc)
            return proc

    def wait(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def interrupt(self) -> None:
        with self._lock:
            self.stopping = True
            for proc in self._procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)


def _spawn(p: Point, threads: int, in_flight: InFlight) -> dict[str, Any]:
    """Run one prepared point in a child process (``--jobs``), one of the sweep's ``in_flight``."""
    t0 = time.perf_counter()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    log = p.dir / "log.txt"
    before = _read_json(p.dir / "error.json")  # the last attempt's (the child reads it to count attempts)
    prior = int((before or {}).get("attempts", 0))
    with log.open("w") as fh:
        proc = in_flight.start([sys.executable, "-m", "lesft.sweep", "--one", str(p.dir)], stdout=fh,
                               stderr=subprocess.STDOUT, env=env)
        rc = 130 if proc is None else in_flight.wait(proc)  # None: the sweep stopped before this run began
    wall = time.perf_counter() - t0
    err = _read_json(p.dir / "error.json")
    if err is not None and err == before:  # not this attempt's: the child died before it removed it
        err = None
    if rc == 0 and err is None:
        return {"ok": True, "action": "run", "wall_s": wall}
    if rc == 130 and err is None:  # Ctrl-C: the child checkpointed; the next sweep resumes it
        return {"ok": False, "action": "run", "wall_s": wall,
                "error": {"stage": "interrupted", "type": "KeyboardInterrupt", "message": "resumes from its checkpoint"}}
    if err is None:  # killed before it could write one (out of memory, signal)
        tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
        why = f" ({_signal_cause(-rc)})" if rc < 0 else ""
        err = {"type": "ChildProcessError", "message": f"exit code {rc}{why}; see {log}", "stage": "process",
               "traceback": tail, "attempts": prior + 1, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_json(p.dir / "error.json", err)
    return {"ok": False, "action": "run", "wall_s": wall, "error": err}


