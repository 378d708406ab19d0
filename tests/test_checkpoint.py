"""Checkpoints lose nothing: a run killed at any point and resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
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


# ---------------------------------------------------------------- damaged checkpoints are detected


def with_rounds(args: list[str], n: int) -> list[str]:
    i = args.index("--rounds")
    return args[:i + 1] + [str(n)] + args[i + 2:]


def flip_exponent_bit(path, prefix: str = "client0.lora.") -> None:
    """Flip the top exponent bit of the first float32 of the first tensor named ``prefix...`` in a safetensors
    file (0.01 becomes about 3e36): the file stays well-formed, only its checksum can tell."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k, v in header.items() if k.startswith(prefix) and v["dtype"] == "F32")
    at = 8 + n + header[name]["data_offsets"][0] + 3
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_and_the_previous_one_used(setup, capsys) -> None:
    d, args = setup
    three = with_rounds(args, 3)
    assert main(three + ["--out", str(d / "ref3")]) == 0
    _, ref_losses, ref_adapter = _result(d / "ref3")
    out = d / "flipped"
    assert main(with_rounds(args, 2) + ["--out", str(out)]) == 0
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["rounds_done"] == 2 and len(state["files"]["tensors.safetensors"]["sha256"]) == 64
    assert json.loads((out / "checkpoint.old" / "state.json").read_text())["rounds_done"] == 1
    flip_exponent_bit(out / "checkpoint" / "tensors.safetensors")
    capsys.readouterr()
    assert main(three + ["--out", str(out), "--resume", "true"]) == 0
    said = capsys.readouterr().out
    assert f"{out / 'checkpoint' / 'tensors.safetensors'} does not match the checksum" in said
    assert f"using the previous checkpoint {out / 'checkpoint.old'}" in said
    summary, losses, adapter = _result(out)
    assert summary["resumed_from_round"] == 1 and losses == ref_losses  # rounds 2 and 3 retrained
    assert all(torch.equal(adapter[k], ref_adapter[k]) for k in ref_adapter)


@pytest.mark.parametrize("damage", ["truncate tensors", "truncate state", "flip a bit"])
def test_a_damaged_checkpoint_without_a_good_previous_one_is_refused_naming_the_file(setup, capsys, damage) -> None:
    d, args = setup
    two = with_rounds(args, 2)
    out = d / f"damaged-{damage.replace(' ', '-')}"
    assert main(two + ["--out", str(out)]) == 0
    for ck in ("checkpoint", "checkpoint.old"):
        t, s = out / ck / "tensors.safetensors", out / ck / "state.json"
        if damage == "truncate tensors":
            t.write_bytes(t.read_bytes()[:1000])
        elif damage == "truncate state":
            s.write_text(s.read_text()[:50])
        else:
            flip_exponent_bit(t)
    capsys.readouterr()
    assert main(with_rounds(args, 3) + ["--out", str(out), "--resume", "true"]) == 2
    err = capsys.readouterr().err
    named = "state.json" if damage == "truncate state" else "tensors.safetensors"
    assert str(out / "checkpoint" / named) in err and str(out / "checkpoint.old" / named) in err
    assert "Traceback" not in err


def test_the_split_servers_checkpoint_is_verified_too(server_model, tmp_path, capsys) -> None:
    from lesft import methods
    from lesft.checkpoint import CheckpointError
    from lesft.config import TrainConfig
    from lesft.deploy.cli import build_service
    from lesft.deploy.wire import NetArgs
    from lesft.lora import LoraArgs, lora_state
    from lesft.messages import Activations, PathBatch, encode

    cfg = methods.resolve(TrainConfig(method="sl", model=str(server_model), client_layers="1", grad_accum=1,
                                      device="cpu", lora=LoraArgs(r=4, alpha=8, dropout=0.0)))
    labels = torch.full((1, 5), -100)
    labels[:, -2:] = 7
    service = build_service(cfg, NetArgs(), [0], tmp_path)
    for step in range(2):
        msg = Activations(0, step, PathBatch(torch.full((1, 5, 32), 0.1), torch.ones(1, 5, dtype=torch.long),
                                             torch.arange(5)[None].clone(), labels))
        service.exchange(0, bytearray(encode(msg)[0]))
        if step == 0:
            after_round_1 = lora_state(service.server.top)
    flip_exponent_bit(tmp_path / "server_checkpoint" / "tensors.safetensors", prefix="lora.")
    capsys.readouterr()
    again = build_service(cfg, NetArgs(), [0], tmp_path)
    assert "does not match the checksum" in capsys.readouterr().out
    assert again.step == 1 and any("server_checkpoint.old at step 1" in line for line in again.log)
    got = lora_state(again.server.top)
    assert all(torch.equal(got[k], after_round_1[k]) for k in got)
    import shutil

    shutil.rmtree(tmp_path / "server_checkpoint.old")
    t = tmp_path / "server_checkpoint" / "tensors.safetensors"
    t.write_bytes(t.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(t)):
        build_service(cfg, NetArgs(), [0], tmp_path)


def test_resume_takes_defaults_for_fields_added_since(setup, capsys) -> None:
    """A run saved before a field existed -- top-level (pack_ints) or in a group (synthetic.reference_style) --
    resumes: the missing field takes its default (it used to be 'config differs in [synthetic]')."""
    import yaml

    d, args = setup
    short = [a if a != "12" else "2" for a in args]
    assert main(short + ["--out", str(d / "old")]) == 0
    saved = yaml.safe_load((d / "old" / "config.yaml").read_text())
    saved.pop("pack_ints")
    saved["synthetic"].pop("reference_style")
    (d / "old" / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert main(short + ["--out", str(d / "old"), "--resume", "true"]) == 0, capsys.readouterr().err
    assert main(short + ["--out", str(d / "old"), "--resume", "true", "--synthetic.reference_style", "worded"]) == 2
    assert "config differs in ['synthetic.reference_style']" in capsys.readouterr().err
