"""Checkpoints lose nothing: a run killed at any point and resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from lesft.cli import main


@pytest.fixture(scope="module")
def setup(assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    args = ["train", "--model", str(assets / "model"), "--data", str(assets / "rows.jsonl"), "--samples", "0",
            "--method", "lesft", "--clients", "2", "--rounds", "12", "--grad_accum", "1", "--aggregate_every", "4",
            "--checkpoint_every", "1", "--client_layers", "1", "--max_length", "384", "--progress", "false",
            "--device", "cpu"]
    return d, args


def _result(out):
    summary = json.loads((out / "summary.json").read_text())
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, losses, load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_kill_and_resume_equals_uninterrupted(setup) -> None:
    d, args = setup
    assert main(args + ["--out", str(d / "ref")]) == 0
    ref_summary, ref_losses, ref_adapter = _result(d / "ref")

    out = d / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "lesft.cli", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(metrics.read_text().splitlines())
    assert 4 <= done_before < 12

    assert main(args + ["--out", str(out)]) == 2  # a run is there: refuse to clobber it without --resume
    assert main(args + ["--out", str(out), "--resume", "true"]) == 0
    summary, losses, adapter = _result(out)
    assert summary["resumed_from_round"] >= done_before - 1
    assert losses == ref_losses
    assert summary["comm_bytes"] == ref_summary["comm_bytes"]
    assert summary["comm_detail"] == ref_summary["comm_detail"]
    assert adapter.keys() == ref_adapter.keys()
    assert all((adapter[k] == ref_adapter[k]).all() for k in adapter)

    # resuming a finished run retrains nothing and returns the same summary
    mtime = (out / "summary.json").stat().st_mtime_ns
    assert main(args + ["--out", str(out), "--resume", "true"]) == 0
    assert (out / "summary.json").stat().st_mtime_ns == mtime


def test_resume_refuses_a_different_config(setup, capsys) -> None:
    d, args = setup
    short = [a if a != "12" else "2" for a in args]
    assert main(short + ["--out", str(d / "x")]) == 0
    assert main(short + ["--out", str(d / "x"), "--resume", "true", "--lr", "0.1"]) == 2
    assert "config differs in ['lr']" in capsys.readouterr().err
    assert main(short + ["--out", str(d / "x"), "--overwrite", "true", "--lr", "0.1"]) == 0


def test_train_eval_puts_accuracy_into_summary(setup) -> None:
    d, args = setup
    short = [a if a != "12" else "1" for a in args]
    out = d / "with_eval"
    assert main(short + ["--out", str(out), "--eval", "--evaluation.dataset", "synthetic",
                         "--evaluation.limit", "6", "--evaluation.max_new_tokens", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    preds = [json.loads(x) for x in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == summary["eval"]["n"] == 6
    assert summary["accuracy"] == sum(p["correct"] for p in preds) / 6
    assert main(["eval", "--run", str(out), "--dataset", "synthetic", "--limit", "4", "--max_new_tokens", "8", "--out", str(d / "ev")]) == 0
    assert json.loads((d / "ev" / "eval.json").read_text())["n"] == 4
