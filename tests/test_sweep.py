"""lesft.sweep: expansion and names, runs + skip + redo, failures recorded and retried, resume, eval, --jobs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lesft import sweep as sw
from lesft.sweep import expand, run_sweep




def base(assets: Path, **kw) -> dict:
    return {"model": str(assets / "model"), "data": str(assets / "rows.jsonl"), "samples": 0, "clients": 2,
            "rounds": 2, "grad_accum": 1, "max_length": 384, "progress": False, "device": "cpu",
            "checkpoint_every": 1, **kw}


def write_spec(path: Path, spec: dict) -> str:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}


# ----------------------------------------------------------------------------------------------- expand


def test_expand_names_and_checks() -> None:
    spec = {"base": {"method": "lesft", "lora": {"r": 4}},
            "grid": {"method": ["sl", "lesft"], "client_layers": ["1/2", "1/4"], "seed": [0, 1]},
            "runs": [{"method": "base"}, {"method": "lesft", "aggregate_every": 0, "seed": [0, 1]},
                     {"lora.target_modules": ["q_proj", "v_proj"], "dataset": "gsm8k"}],
            "eval": {"limit": 5}}
    points = expand(spec)
    names = [n for n, _ in points]
    assert names[:2] == ["method=sl__client_layers=1-2__seed=0", "method=sl__client_layers=1-2__seed=1"]
    assert "method=lesft__client_layers=1-4__seed=0" in names
    # base: only the keys that can change an untuned model's answers; the list expands within its entry
    assert names[8:] == ["method=base", "method=lesft__aggregate_every=0__seed=0",
                         "method=lesft__aggregate_every=0__seed=1", "lora.target_modules=q_proj+v_proj__data=gsm8k"]
    assert dict(points)["lora.target_modules=q_proj+v_proj__data=gsm8k"] == {
        "lora.target_modules": ["q_proj", "v_proj"], "data": "gsm8k"}  # alias 'dataset' -> 'data'
    assert expand({"grid": {"method": ["sl", "base"], "seed": [0, 1]}, "eval": {}})[2:] == [
        ("method=base", {"method": "base"})]  # one base run for every seed
    # two values with the same slug: both names get a hash of their values, stable across calls
    clash = expand({"grid": {"client_layers": ["1/4", "1-4"]}})
    assert len({n for n, _ in clash}) == 2 and all("~" in n for n, _ in clash)
    assert clash == [("client_layers=1-4~9dab26d3", {"client_layers": "1/4"}),  # pinned: the same in every
                     ("client_layers=1-4~80817671", {"client_layers": "1-4"})]  # process and on every machine
    assert expand({}) == [("default", {})]

    with pytest.raises(ValueError, match="unknown config key 'lora.rr'"):
        expand({"grid": {"lora.rr": [1, 2]}})
    with pytest.raises(ValueError, match="non-empty list"):
        expand({"grid": {"seed": 3}})
    with pytest.raises(ValueError, match="set by the sweep"):
        expand({"base": {"out": "x"}})
    with pytest.raises(ValueError, match="needs an 'eval' section"):
        expand({"runs": [{"method": "base"}]})
    with pytest.raises(ValueError, match="unknown eval key"):
        expand({"eval": {"limitt": 3}})
    with pytest.raises(ValueError, match="unknown validation key"):
        expand({"validation": {"limitt": 3}})
    with pytest.raises(ValueError, match=r"validation.out is set by the sweep \(RUN/eval-validation\)"):
        expand({"validation": {"out": "x"}})
    assert expand({"runs": [{"method": "base"}], "validation": {}}) == [("method=base", {"method": "base"})]
    # validation: eval's settings, the validation split, then its own on top
    assert sw.evaluations({"eval": {"limit": 5, "seed": 1}, "validation": {"limit": 3}}) == {
        "eval": {"limit": 5, "seed": 1}, "eval-validation": {"limit": 3, "seed": 1, "split": "validation"}}
    assert sw.evaluations({"validation": {}}) == {"eval-validation": {"split": "validation"}}
    assert sw.evaluations({}) == {}
    with pytest.raises(ValueError, match="unknown top-level"):
        expand({"grids": {}})


# ----------------------------------------------------------------------------------------------- run


def test_sweep_runs_skips_and_redoes(assets, tmp_path, capsys) -> None:
    spec = write_spec(tmp_path / "s.yaml", {"name": "t", "base": base(assets),
                                            "grid": {"method": ["sl", "lesft"], "client_layers": ["1", "2"]}})
    out = tmp_path / "out"
    dry = run_sweep(spec, str(out), dry_run=True)
    assert len(dry) == 4 and {r["status"] for r in dry} == {"pending"} and not out.exists()
    printed = capsys.readouterr().out
    assert "4 runs" in printed and all(r["name"] in printed for r in dry)

    first = run_sweep(spec, str(out))
    assert [r["status"] for r in first] == ["done"] * 4 and {r["action"] for r in first} == {"run"}
    names = [r["name"] for r in first]
    assert names[0] == "method=sl__client_layers=1"
    for n in names:
        s = json.loads((out / n / "summary.json").read_text())
        assert s["rounds"] == 2 and s["method"] == n.split("__")[0].split("=")[1]
        assert yaml.safe_load((out / n / "config.input.yaml").read_text())["out"] == str(out / n)
    meta = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in meta["runs"]] == ["done"] * 4 and meta["spec"]["name"] == "t"
    assert meta["keys"]["grid"] == ["method", "client_layers"] and meta["overhead_s"] >= 0
    before = mtimes(out)

    again = run_sweep(spec, str(out))  # everything finished: nothing is touched
    assert {r["action"] for r in again} == {"skip"} and mtimes(out) == before

    shutil.rmtree(out / names[2])  # one run lost: only that one is redone
    third = run_sweep(spec, str(out))
    assert [r["action"] for r in third] == ["skip", "skip", "run", "skip"]
    now = mtimes(out)
    assert {n: now[n] for n in names if n != names[2]} == {n: before[n] for n in names if n != names[2]}
    assert now[names[2]] != before[names[2]]

    # an interrupted run (checkpoint, no summary) continues from its checkpoint
    (out / names[1] / "summary.json").unlink()
    # and one stopped before its first checkpoint starts again
    (out / names[3] / "summary.json").unlink()
    for ckpt in ("checkpoint", "checkpoint.old"):
        shutil.rmtree(out / names[3] / ckpt, ignore_errors=True)
    fourth = run_sweep(spec, str(out), dry_run=True)
    assert fourth[1]["status"] == "interrupted" and fourth[1]["action"] == "resume"
    assert fourth[1]["detail"] == "checkpoint after round 2, 2 rounds logged"  # how far it got
    assert (fourth[3]["status"], fourth[3]["detail"]) == ("pending", "2 rounds logged, no checkpoint yet")
    assert [r["action"] for r in run_sweep(spec, str(out))] == ["skip", "resume", "skip", "run"]
    assert json.loads((out / names[1] / "summary.json").read_text())["resumed_from_round"] == 2

    # the spec changed under a finished run: it is refused, not silently reused or overwritten
    changed = write_spec(tmp_path / "s2.yaml", {"name": "t", "base": base(assets, lr=1e-3),
                                                "grid": {"method": ["sl", "lesft"], "client_layers": ["1", "2"]}})
    stale = run_sweep(changed, str(out), dry_run=True)
    assert {r["status"] for r in stale} == {"stale"} and "lr" in stale[0]["detail"]


def test_failed_point_is_recorded_and_retried(assets, tmp_path, capsys) -> None:
    # client_layers 9 > 3 (a 4-layer model): this point fails, the other one finishes
    # and a switch combination the presets refuse fails before any model is loaded
    spec = write_spec(tmp_path / "s.yaml", {"name": "f", "base": base(assets, rounds=1, method="sl"),
                                            "grid": {"client_layers": ["9", "1"]},
                                            "runs": [{"paths": "dual"}]})
    out = tmp_path / "out"
    res = run_sweep(spec, str(out))
    assert [r["status"] for r in res] == ["failed", "done", "failed"]
    err = json.loads((out / "client_layers=9" / "error.json").read_text())
    assert err["type"] == "ValueError" and "client_layers" in err["message"] and err["stage"] == "train"
    assert "Traceback" in err["traceback"] and err["attempts"] == 1
    assert "FAILED client_layers=9" in capsys.readouterr().err
    err = json.loads((out / "paths=dual" / "error.json").read_text())
    assert err["stage"] == "config" and "paths=dual with loss=ce" in err["message"]
    assert json.loads((out / "sweep.json").read_text())["counts"] == {"done": 1, "failed": 2}

    before = mtimes(out)
    res = run_sweep(spec, str(out))  # a later call retries the failed runs only
    assert [r["action"] for r in res] == ["retry", "skip", "retry"] and mtimes(out) == before
    assert json.loads((out / "client_layers=9" / "error.json").read_text())["attempts"] == 2


def test_eval_and_base_method(assets, tmp_path, monkeypatch) -> None:
    """Evaluation through lesft.evaluate.run_eval (mocked: no generation here): a trained run is evaluated
    from its run directory, 'base' is the model without an adapter; a new eval spec re-evaluates only."""
    import lesft.evaluate as ev

    calls = []

    def fake_run_eval(cfg, model=None, adapter=None, run_dir=None):
        calls.append({"dataset": cfg.dataset, "limit": cfg.limit, "model": model, "adapter": adapter,
                      "run_dir": run_dir})
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        res = {"dataset": cfg.dataset, "split": cfg.split, "mode": cfg.mode, "n": cfg.limit, "correct": 1,
               "accuracy": 1 / cfg.limit, "ci95": [0.0, 0.5],
               "config": {"dataset": cfg.dataset, "split": cfg.split, "limit": cfg.limit}}
        (Path(cfg.out) / "eval.json").write_text(json.dumps(res))
        return res

    monkeypatch.setattr(ev, "run_eval", fake_run_eval)
    spec = {"name": "e", "base": base(assets, rounds=1, client_layers="1"),
            "grid": {"method": ["sl", "base"]}, "eval": {"dataset": "synthetic", "limit": 4}}
    out = tmp_path / "out"
    res = run_sweep(write_spec(tmp_path / "s.yaml", spec), str(out))
    assert [(r["name"], r["status"]) for r in res] == [("method=sl", "done"), ("method=base", "done")]
    assert calls[0]["run_dir"] == str(out / "method=sl") and calls[0]["limit"] == 4
    assert calls[1] == {"dataset": "synthetic", "limit": 4, "model": str(assets / "model"), "adapter": None,
                        "run_dir": None}
    assert not (out / "method=base" / "summary.json").exists()  # nothing trained

    spec["eval"]["limit"] = 5  # another eval spec: evaluate again, do not retrain
    before = mtimes(out)
    res = run_sweep(write_spec(tmp_path / "s.yaml", spec), str(out))
    assert [r["action"] for r in res] == ["eval", "eval"] and mtimes(out) == before
    assert [c["limit"] for c in calls[2:]] == [5, 5]
    assert [r["action"] for r in run_sweep(str(tmp_path / "s.yaml"), str(out))] == ["skip", "skip"]

    # `lesft eval --run` with other settings overwrites eval.json (the sweep's marker stays): no longer done
    e = json.loads((out / "method=sl" / "eval" / "eval.json").read_text())
    e["config"]["limit"] = 50
    (out / "method=sl" / "eval" / "eval.json").write_text(json.dumps(e))
    assert [r["status"] for r in run_sweep(str(tmp_path / "s.yaml"), str(out), dry_run=True)] == ["needs-eval", "done"]
    run_sweep(str(tmp_path / "s.yaml"), str(out))

    spec["base"]["lr"] = 1e-3  # a training-only change: the trained run is stale, the base run is not
    res = run_sweep(write_spec(tmp_path / "s2.yaml", spec), str(out), dry_run=True)
    assert [r["status"] for r in res] == ["stale", "done"]

    # a validation added to the finished sweep: each run evaluated on the validation split only
    spec = {**spec, "validation": {"limit": 3}}
    del spec["base"]["lr"]
    before = mtimes(out)
    test_json = {d: (out / d / "eval" / "eval.json").read_text() for d in ("method=sl", "method=base")}
    n = len(calls)
    assert [r["status"] for r in run_sweep(write_spec(tmp_path / "s3.yaml", spec), str(out), dry_run=True)] == [
        "needs-eval", "needs-eval"]
    res = run_sweep(str(tmp_path / "s3.yaml"), str(out))
    assert [(r["status"], r["action"]) for r in res] == [("done", "eval"), ("done", "eval")]
    assert [(c["limit"], c["run_dir"]) for c in calls[n:]] == [(3, str(out / "method=sl")), (3, None)]
    assert mtimes(out) == before and all((out / d / "eval" / "eval.json").read_text() == t for d, t in test_json.items())
    v = json.loads((out / "method=sl" / "eval-validation" / "eval.json").read_text())
    assert v["split"] == "validation" and v["config"] == {"dataset": "synthetic", "split": "validation", "limit": 3}
    assert [r["action"] for r in run_sweep(str(tmp_path / "s3.yaml"), str(out))] == ["skip", "skip"]

    from lesft.report import write_report  # the sweep's directory reports, base row included

    md = write_report(str(out)).read_text()
    # the interval as recorded in eval.json (the fake above: [0, 0.5]), not a symmetric ±
    assert "| base | **20.0 [0.0, 50.0] (n=5)** |" in md and "| sl | **20.0 [0.0, 50.0] (n=5)** |" in md  # a tie


def test_jobs_run_in_child_processes(assets, tmp_path) -> None:
    spec = write_spec(tmp_path / "s.yaml", {"name": "j", "base": base(assets, rounds=1, method="sl"),
                                            "grid": {"client_layers": ["1", "9"]}})
    out = tmp_path / "out"
    res = run_sweep(spec, str(out), jobs=2)
    assert [r["status"] for r in res] == ["done", "failed"]
    assert (out / "client_layers=1" / "log.txt").is_file()
    assert json.loads((out / "client_layers=9" / "error.json").read_text())["type"] == "ValueError"
    assert sw.main(["--one", str(out / "client_layers=1")]) == 0  # finished: returns at once


def _processes_naming(text: str) -> list[int]:
    """Pids of the processes whose command line holds ``text``."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the sweep's children")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_a_jobs_sweep_checkpoints_its_runs_and_leaves_no_process(assets, tmp_path, sig) -> None:
    """`kill -INT PID`, `kill PID` or a closed terminal's SIGHUP to a `--jobs 2` sweep alone, started with SIGINT
    ignored (as a script's background job is): every run in flight checkpoints, the sweep exits 130, no child is left, and the
    next call resumes both runs."""
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "s.yaml", {"name": "k", "base": base(assets, rounds=400, method="sl",
                                                                      client_layers="1"), "grid": {"seed": [0, 1]}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lesft.cli", "sweep", spec, "--out", str(out), "--jobs", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        logs = [out / f"seed={s}" / "metrics.jsonl" for s in (0, 1)]
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if all(f.is_file() and len(f.read_text().splitlines()) >= 2 for f in logs):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        assert len(_processes_naming(str(out))) == 3  # the sweep and its two runs
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        for pid in _processes_naming(str(out)):  # whatever a failure left
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Resume with: lesft sweep" in err and _processes_naming(str(out)) == []
    assert [r["status"] for r in run_sweep(spec, str(out), dry_run=True)] == ["interrupted", "interrupted"]
    for f in logs:
        state = json.loads((f.parent / "checkpoint" / "state.json").read_text())
        assert 2 <= state["rounds_done"] == len(f.read_text().splitlines()) < 400


def test_a_field_added_since_a_run_does_not_make_it_stale() -> None:
    from lesft.config import TrainConfig
    from lesft.typed import to_dict
    from lesft.sweep.status import _config_diff

    now = to_dict(TrainConfig())
    old = {k: v for k, v in now.items() if k != "label_privacy"}  # a run made before the field existed
    assert _config_diff(old, now) == []
    assert _config_diff(old, {**now, "label_privacy": True}) == ["label_privacy"]


def test_a_killed_child_names_its_signal() -> None:
    """A Ctrl-C during evaluation (exit -2) is not reported as running out of memory; SIGKILL may be."""
    from lesft.sweep.point import _signal_cause
    assert "SIGINT" in _signal_cause(2) and "memory" not in _signal_cause(2)
    assert "SIGTERM" in _signal_cause(15) and "retries" in _signal_cause(15)
    assert "out of memory" in _signal_cause(9)
    assert _signal_cause(11) == "killed by SIGSEGV"


def test_a_killed_child_counts_its_attempts(tmp_path, monkeypatch) -> None:
    """A child killed before it could write error.json (out of memory) is attempt 1, then 2, ... (was always 1)."""
    import types

    from lesft.sweep.point import InFlight, _spawn

    class Killed(InFlight):  # every child dies of SIGKILL
        def start(self, argv, **kw):
            return object()

        def wait(self, proc) -> int:
            return -9

    point = types.SimpleNamespace(dir=tmp_path, name="p")
    for attempt in (1, 2, 3):
        res = _spawn(point, 1, Killed())
        assert not res["ok"] and res["error"]["attempts"] == attempt
        assert json.loads((tmp_path / "error.json").read_text())["attempts"] == attempt
