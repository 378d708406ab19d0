"""A new user's first hour: bad inputs get a message naming cause and fix (before any model loads), Ctrl-C
loses nothing, refusals instead of silent success, a model that can be taken out, trl's row formats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import rows
from lesft.cli import main
from lesft.config import TrainConfig

NO_CUDA = not torch.cuda.is_available()

# --------------------------------------------------------------------------------------------------
# The table of bad inputs. Each: (id, YAML text for --config or None, extra argv, what the message must
# contain). Every one must exit non-zero with one "lesft: error:" / usage line, no traceback, and load no
# model (lesft.train.load_model raises if it is called).
# --------------------------------------------------------------------------------------------------
BAD_TRAIN = [
    ("yaml-str-for-int", "rounds: two\n", [], ["c.yaml", "rounds: expected int, got 'two'", "whole number"]),
    ("yaml-str-for-float", "lr: fast\n", [], ["c.yaml", "lr: expected float, got 'fast'", "2e-4"]),
    ("yaml-bool", "eval: maybe\n", [], ["c.yaml", "eval: expected bool", "true or false"]),
    ("yaml-list", "lora:\n  target_modules: 5\n", [], ["c.yaml", "lora.target_modules: expected a list"]),
    ("yaml-list-for-float", "lesft:\n  p_sal: [1, 2]\n", [], ["c.yaml", "lesft.p_sal: expected float"]),
    ("yaml-null", "clients: null\n", [], ["c.yaml", "clients: may not be empty"]),
    ("yaml-range", "clients: 0\n", [], ["c.yaml", "clients must be >= 1"]),
    ("yaml-syntax", "rounds: [1,\n", [], ["c.yaml", "not valid YAML"]),
    ("yaml-not-mapping", "- lr\n", [], ["c.yaml", "must hold a mapping"]),
    ("yaml-hf-name", "learning_rate: 1e-4\n", [], ["unknown config field 'learning_rate'", "did you mean lr?"]),
    ("yaml-typo", "lora:\n  alpah: 4\n", [], ["unknown config field 'lora.alpah'", "did you mean alpha?"]),
    ("yaml-group-not-mapping", "lora: 8\n", [], ["c.yaml", "lora: expected a group of fields (r, alpha"]),
    ("flag-hf-lr", None, ["--learning_rate", "1e-4"], ["unrecognized arguments", "did you mean --lr?"]),
    ("flag-hf-epochs", None, ["--num_train_epochs", "3"], ["did you mean --epochs?"]),
    ("flag-hf-alpha", None, ["--lora_alpha", "32"], ["did you mean --lora.alpha?"]),
    ("flag-hf-bf16", None, ["--bf16"], ["did you mean --dtype bf16?"]),
    ("flag-hf-out", None, ["--output_dir", "x"], ["did you mean --out?"]),
    ("flag-typo", None, ["--client_layrs", "3"], ["did you mean --client_layers?"]),
    ("flag-int", None, ["--rounds", "two"], ["invalid int value: 'two'"]),
    ("flag-bool", None, ["--eval", "maybe"], ["expected true/false"]),
    ("method", None, ["--method", "nope"], ["unknown method 'nope'"]),
    ("partition", None, ["--partition", "dirichlet:x"], ["partition must be 'iid' or 'dirichlet:ALPHA'"]),
    ("wire-dtype", None, ["--wire_dtype", "int3"], ["wire_dtype must be one of fp32, bf16, fp16, int8, int4"]),
    ("data-missing", None, ["--data", "nope.jsonl"], ["data file not found"]),
    ("eval-loglik", None, ["--data", "synthetic", "--eval", "--evaluation.mode", "loglik"],
     ["mode 'loglik' needs a multiple-choice dataset", "use mode 'generate'"]),
    ("eval-jsonl-no-dataset", None, ["--eval"], ["not a benchmark", "--evaluation.dataset"]),
    ("eval-split", None, ["--eval", "--evaluation.dataset", "synthetic", "--evaluation.split", "nope"],
     ["has no split 'nope'"]),
    ("eval-dataset", None, ["--eval", "--evaluation.dataset", "mmlu"], ["unknown benchmark 'mmlu'", "register_benchmark"]),
    ("eval-range", None, ["--eval", "--evaluation.limit", "-1"], ["limit must be >= 0"]),
    ("lora-range", None, ["--lora.dropout", "1.5"], ["lora.dropout must be in [0, 1)"]),
    ("yaml-lora-r", "lora:\n  r: 0\n", [], ["c.yaml", "lora.r must be >= 1"]),
    ("yaml-weighting", "lesft:\n  weighting: uniform=x\n", [], ["c.yaml", "cannot parse the constant"]),
    ("per-client", None, ["--per_client", "-1"], ["per_client must be >= 0"]),
    ("dtype", None, ["--dtype", "fp16"], ["dtype must be fp32 or bf16"]),
    ("rounds", None, ["--rounds", "-1"], ["need rounds >= 1 or epochs > 0"]),
    ("loss-needs-dual", None, ["--method", "sl", "--loss", "lesft"], ["paths"]),
]
if NO_CUDA:
    BAD_TRAIN.append(("device-cuda", None, ["--device", "cuda"], ["sees no CUDA device", "--device cpu"]))
BAD_TRAIN.append(("device-name", None, ["--device", "tpu9"], ["unknown device 'tpu9'", "cpu, cuda"]))


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded."""
    import lesft.train

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(lesft.train, "load_model", refuse)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("yaml_text,argv,must", [b[1:] for b in BAD_TRAIN], ids=[b[0] for b in BAD_TRAIN])
def test_bad_train_input_is_refused_before_any_model_loads(assets, tmp_path, capsys, no_model, yaml_text, argv,
                                                            must) -> None:
    base = ["train", "--model", str(assets / "model"), "--data", str(assets / "rows.jsonl"), "--out",
            str(tmp_path / "run"), "--progress", "false", "--device", "cpu"]
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        base += ["--config", str(tmp_path / "c.yaml")]
    rc, err = _run(base + argv, capsys)
    assert rc != 0 and "Traceback" not in err
    for m in must:
        assert m in err, f"{m!r} not in {err!r}"


def test_yaml_numbers_as_trl_and_peft_users_write_them(tmp_path) -> None:
    from lesft.cli import _config, build_parser

    (tmp_path / "c.yaml").write_text("lr: 2e-4\nweight_decay: 1e-2\nsamples: 1e3\nepochs: 2\nclient_layers: 2\n"
                                     "lora:\n  target_modules: q_proj\n")
    cfg = _config(build_parser("train").parse_args(["train", "--config", str(tmp_path / "c.yaml")]))
    assert (cfg.lr, cfg.weight_decay, cfg.samples, cfg.epochs, cfg.client_layers) == (2e-4, 0.01, 1000, 2.0, "2")
    assert isinstance(cfg.epochs, float) and cfg.lora.target_modules == ["q_proj"]


# ------------------------------------------------------------------ other commands' refusals

def _write_adapter(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"")
    return d


BAD_OTHER = [
    ("report-empty", lambda t: ["report", str(_mk(t / "empty"))], ["nothing to report", "lesft sweep"]),
    ("report-missing", lambda t: ["report", str(t / "nope")], ["sweep directory not found"]),
    ("report-one-run", lambda t: ["report", str(_mk(t / "run", "config.yaml"))], ["one run's directory"]),
    ("join-existing", lambda t: ["join", str(_write_adapter(t / "a")), str(_write_adapter(t / "b")), "--out",
                                 str(_write_adapter(t / "out"))], ["already holds an adapter", "--overwrite"]),
    ("merge-alias-existing", lambda t: ["merge", str(_write_adapter(t / "a")), str(_write_adapter(t / "b")),
                                        "--out", str(_write_adapter(t / "out"))], ["already holds an adapter"]),
    ("join-one", lambda t: ["join", str(_write_adapter(t / "a")), "--out", str(t / "o")], ["at least two"]),
    ("export-existing", lambda t: ["export", "--run", str(t), "--out", str(_mk(t / "m", "config.json"))],
     ["already holds a model", "--overwrite"]),
    ("export-no-run", lambda t: ["export", "--run", str(t / "nope"), "--out", str(t / "m")],
     ["not a training run directory"]),
    ("eval-no-run", lambda t: ["eval", "--run", str(t / "nope")], ["not a training run directory"]),
    ("eval-loglik", lambda t: ["eval", "--model", "x", "--dataset", "gsm8k", "--mode", "loglik"],
     ["needs a multiple-choice dataset"]),
    ("eval-hf-flag", lambda t: ["eval", "--per_device_eval_batch_size", "4"], ["unrecognized arguments"]),
    ("eval-limit", lambda t: ["eval", "--model", "x", "--limit", "-1"], ["limit must be >= 0"]),
    ("eval-mode", lambda t: ["eval", "--model", "x", "--mode", "nope"], ["mode must be 'generate' or 'loglik'"]),
    ("eval-dataset", lambda t: ["eval", "--model", "x", "--dataset", "mmlu"], ["unknown benchmark 'mmlu'", "register_benchmark"]),
    ("export-nothing", lambda t: ["export", "--out", str(t / "m")], ["export needs --run RUN_DIR, or both"]),
    ("sweep-yaml", lambda t: ["sweep", str(_text(t / "s.yaml", "base: [1,\n")), "--out", str(t / "o")],
     ["not valid YAML"]),
    ("sweep-key", lambda t: ["sweep", str(_text(t / "s.yaml", "grid:\n  lora.rank: [1, 2]\n")), "--out",
                             str(t / "o")], ["unknown config key 'lora.rank'"]),
    ("sweep-type", lambda t: ["sweep", str(_text(t / "s.yaml", "base:\n  lr: fast\n  model: nope\n")), "--out",
                              str(t / "o")], ["lr: expected float, got 'fast'"]),
    ("sweep-jobs", lambda t: ["sweep", str(_text(t / "s.yaml", "base: {}\n")), "--out", str(t / "o"), "--jobs", "0"],
     ["--jobs must be >= 1"]),
]


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mk(d: Path, file: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if file:
        (d / file).write_text("{}")
    return d


@pytest.mark.parametrize("argv,must", [b[1:] for b in BAD_OTHER], ids=[b[0] for b in BAD_OTHER])
def test_bad_input_to_other_commands_is_refused(tmp_path, capsys, argv, must) -> None:
    rc, err = _run(argv(tmp_path), capsys)
    assert rc != 0 and "Traceback" not in err
    for m in must:
        assert m in err, f"{m!r} not in {err!r}"
    assert not (tmp_path / "empty" / "report.md").exists()


def test_bad_jsonl_rows_of_trl_formats(tmp_path) -> None:
    from lesft.data.rows import DataError, load_jsonl

    for row, msg in [({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]},
                      "must be the assistant's"),
                     ({"messages": "hi"}, "'messages' must be a list"),
                     ({"prompt": "p"}, "or trl's {prompt, completion} or {messages}")]:
        (tmp_path / "r.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=msg):
            load_jsonl(tmp_path / "r.jsonl")


# ------------------------------------------------------------------ training-time checks and outputs

def _train_args(assets, out, *extra) -> list[str]:
    return ["train", "--model", str(assets / "model"), "--data", str(assets / "rows.jsonl"), "--samples", "0",
            "--method", "lesft", "--clients", "2", "--grad_accum", "1", "--client_layers", "1", "--max_length",
            "384", "--progress", "false", "--device", "cpu", "--out", str(out), *extra]


def test_unmatched_target_modules_are_refused_naming_the_real_ones(assets, tmp_path, capsys) -> None:
    rc, err = _run(_train_args(assets, tmp_path / "r", "--rounds", "1", "--lora.target_modules", "gate_proj",
                               "c_attn"), capsys)
    assert rc == 2 and "['c_attn'] match no linear module" in err
    assert all(m in err for m in ("q_proj", "down_proj", "gate_proj"))


def test_trl_rows_train(assets, tmp_path) -> None:
    rs = rows(4)
    with (tmp_path / "trl.jsonl").open("w") as f:
        for i, r in enumerate(rs):
            rec = ({"prompt": r["prompt"], "completion": r["target"], "reference": r["reference"]} if i % 2 else
                   {"messages": [{"role": "user", "content": r["prompt"]},
                                 {"role": "assistant", "content": r["target"]}]})
            f.write(json.dumps(rec) + "\n")
    args = _train_args(assets, tmp_path / "r", "--rounds", "2")
    args[args.index("--data") + 1] = str(tmp_path / "trl.jsonl")
    assert main(args) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_loss"] > 0


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("fin") / "run"
    assert main(_train_args(assets, out, "--rounds", "2")) == 0
    return out


def test_finished_run_is_evaluated_without_retraining(assets, finished) -> None:
    ckpt = finished / "checkpoint" / "state.json"
    before = (ckpt.stat().st_mtime_ns, (finished / "metrics.jsonl").read_text())
    ev = ["--eval", "--evaluation.dataset", "synthetic", "--evaluation.limit", "3", "--evaluation.max_new_tokens", "4"]
    assert main(_train_args(assets, finished, "--rounds", "2", "--resume", *ev)) == 0
    s = json.loads((finished / "summary.json").read_text())
    assert s["eval"]["n"] == 3 and "accuracy" in s
    assert (ckpt.stat().st_mtime_ns, (finished / "metrics.jsonl").read_text()) == before  # nothing retrained
    assert main(_train_args(assets, finished, "--rounds", "2", "--resume", *ev[:-1], "5")) == 0  # other settings
    assert json.loads((finished / "summary.json").read_text())["eval"]["settings"]["max_new_tokens"] == 5


def test_adapter_loads_with_auto_peft_and_export_reproduces_its_logits(finished, tmp_path, capsys) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    cfg = json.loads((finished / "adapter" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).is_absolute()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(finished / "adapter")).eval()
    assert main(["export", "--run", str(finished), "--out", str(tmp_path / "full")]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    full = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full")).eval()
    ids = torch.tensor([[5, 17, 40, 33, 60, 8]])
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, full(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    # and it differs from the base: the adapter was merged in, not dropped
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, b, atol=1e-6)
    assert main(["export", "--run", str(finished), "--out", str(tmp_path / "full")]) == 2  # refused: exists


def test_split_forward_uses_the_supported_cache_argument(tokenizer) -> None:
    from conftest import make_model
    from lesft.model.split import split_model

    bottom, top, _ = split_model(make_model(), 2)
    ids = torch.tensor([[5, 6, 7]])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        h, pos = bottom(ids, torch.ones_like(ids))
        top(h, torch.ones_like(ids), pos)


# ------------------------------------------------------------------ Ctrl-C

@pytest.mark.parametrize("command", ["train", "sweep"])
def test_sigint_checkpoints_the_last_finished_round_and_prints_the_resume_command(assets, tmp_path, command) -> None:
    out = tmp_path / "run"
    train = _train_args(assets, out, "--rounds", "400", "--checkpoint_every", "0")[1:]
    if command == "train":
        argv, metrics = ["train", *train], out / "metrics.jsonl"
    else:
        import yaml

        base = {"model": str(assets / "model"), "data": str(assets / "rows.jsonl"), "samples": 0, "clients": 2,
                "grad_accum": 1, "client_layers": "1", "max_length": 384, "progress": False, "device": "cpu",
                "rounds": 400, "checkpoint_every": 0}
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"base": base, "grid": {"seed": [0]}}))
        argv, metrics = ["sweep", str(tmp_path / "spec.yaml"), "--out", str(out)], out / "seed=0" / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lesft.cli", *argv], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Resume with: lesft " + command in err
    done = len(metrics.read_text().splitlines())
    state = json.loads((metrics.parent / "checkpoint" / "state.json").read_text())
    assert state["rounds_done"] == done >= 2 and done < 400
    cmd = err.split("Resume with: ")[1].split()
    assert cmd[:2] == ["lesft", command]
    # the printed command resumes (here: to a shorter end, to stay fast)
    if command == "train":
        assert main(cmd[1:] + ["--rounds", str(done + 1)]) == 0
        assert len(metrics.read_text().splitlines()) == done + 1


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["export", "--help"],
                                  ["sweep", "--help"], ["report", "--help"]])
def test_help_imports_no_torch_and_is_grouped(argv) -> None:
    code = ("import sys\nfrom lesft.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft', 'matplotlib') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY []" in out
    if argv == ["train", "--help"]:
        assert "--lora.* (LoRA settings):" in out and "method switches (unset: from the --method preset):" in out


def test_report_error_bars_are_the_wilson_bounds() -> None:
    from lesft.report.figures import _yerr
    from lesft.report.tables import Cell
    from lesft.stats import wilson_ci

    lo, hi = wilson_ci(0, 5)
    assert round(100 * hi, 1) == 43.4  # 0/5: [0, 43.4 %], not 0 ± 21.7
    down, up = _yerr([Cell(0.0, lo, hi, [5], None, 1)])
    assert down == [0.0] and up == [pytest.approx(100 * hi)]


def test_tensorboard_logs_loss_when_installed(assets, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(_train_args(assets, tmp_path / "r", "--rounds", "2")) == 0
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses)
    assert "comm_mb/client_to_server" in acc.Tags()["scalars"]


def test_a_config_saved_before_type_checks_still_resumes(tmp_path) -> None:
    from lesft.typed import normalised
    from lesft.sweep.status import _config_diff

    old = {"client_layers": 2, "lr": "2e-4", "lora": {"r": 8}}  # as written unchecked: int and str
    now = {"client_layers": "2", "lr": 2e-4, "lora": {"r": 8}}
    assert _config_diff(normalised(TrainConfig, old), now) == []
    assert normalised(TrainConfig, {"nope": 1}) == {"nope": 1}


def test_two_runs_converting_the_gguf_at_once_both_get_the_model(tmp_path, monkeypatch) -> None:
    """`lesft sweep --jobs 2` on a fresh machine: both runs convert the GGUF into the cache at once. Seen in the
    evidence study: the first run's rename moved the directory the second was still writing into, and the
    second failed with "No such file or directory". Here the second conversion happens inside the first's
    tokenizer save (deterministic interleaving); both must return the same complete directory."""
    from lesft.model import load

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("LESFT_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []
    started: list[bool] = []

    class FakeModel:
        config = type("C", (), {})()

        def save_pretrained(self, d) -> None:
            (Path(d) / "config.json").write_text("{}")
            (Path(d) / "model.safetensors").write_bytes(b"w")

    class FakeTokenizer:
        def save_pretrained(self, d) -> None:
            if not started:  # the other run starts and finishes while this one is writing
                started.append(True)
                calls.append(load._convert_gguf(gguf))
            (Path(d) / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(load.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: FakeModel())
    monkeypatch.setattr(load.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTokenizer())
    first = load._convert_gguf(gguf)
    assert calls == [first]
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary directory left behind
