"""docs/extending.md as written: its extension file registers a loss, a strategy and a benchmark from
outside the package, and they train (CLI, --plugin), evaluate and report end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lesft.cli import main
from lesft.data.registry import BENCHMARKS
from lesft.objectives import OBJECTIVES
from lesft.strategies import STRATEGIES

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture()
def extension_file(tmp_path):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    path = tmp_path / "my_extensions.py"
    path.write_text(code)
    yield path
    OBJECTIVES.pop("focal", None)
    STRATEGIES.pop("trimmed-mean", None)
    BENCHMARKS.pop("sums", None)


def test_the_documented_extensions_train_evaluate_and_report(extension_file, assets, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("LESFT_PLUGINS", raising=False)
    out = tmp_path / "runs" / "focal"
    args = ["--plugin", str(extension_file), "train", "--model", str(assets / "model"), "--data",
            "sums", "--samples", "0", "--method", "splitlora", "--loss", "focal",
            "--aggregation", "trimmed-mean", "--clients", "3", "--rounds", "2", "--aggregate_every", "1",
            "--grad_accum", "1", "--client_layers", "1", "--max_length", "384", "--progress", "false",
            "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < m["token_classes"]["mean_p"] < 1 for m in metrics)  # the focal loss's own statistic
    assert all(m["aggregated"] for m in metrics)
    assert "trimmed-mean" in STRATEGIES and "focal" in OBJECTIVES
    assert json.loads((out / "train_keys.json").read_text())["rows"] == 15  # the benchmark's train split
    assert main(["eval", "--run", str(out), "--limit", "0", "--max_new_tokens", "4"]) == 0
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert (ev["dataset"], ev["split"], ev["n"]) == ("sums", "test", 12)
    assert main(["report", str(out.parent)]) == 0
    report = (out.parent / "report.md").read_text()
    assert "splitlora" in report and "**no overlap**" in report


def test_trimmed_mean_drops_the_extremes(extension_file) -> None:
    from lesft.plugins import load_plugins

    load_plugins([str(extension_file)])
    states = [{"w": torch.tensor([float(v)])} for v in (1, 2, 100)]
    out = STRATEGIES["trimmed-mean"]().combine(states, [1 / 3] * 3)
    assert out["w"].item() == 2.0  # the outlier 100 and the low 1 dropped


def test_an_unknown_loss_is_refused_before_anything_loads(capsys) -> None:
    assert main(["train", "--loss", "focla", "--model", "/nonexistent"]) == 2
    assert "unknown loss 'focla'" in capsys.readouterr().err


def test_a_taken_name_is_refused_unless_replaced() -> None:
    """Registering another definition under a name already taken is an error naming both; the same definition again
    (a module imported twice) and replace=True are fine."""
    from lesft.objectives import OBJECTIVES, register_objective
    from lesft.strategies import STRATEGIES, Strategy, register_strategy

    with pytest.raises(ValueError, match=r"loss 'lesft' is already registered by lesft\.objectives\..*replace=True"):
        register_objective("lesft")(lambda batch, cfg: (None, {}))
    with pytest.raises(ValueError, match=r"aggregation strategy 'fedavg' is already registered"):
        register_strategy("fedavg")(type("Mine", (Strategy,), {}))

    def mine(batch, cfg):
        return None, {}

    try:
        register_objective("test-taken")(mine)
        register_objective("test-taken")(mine)  # the same definition again
        other = register_objective("test-taken", replace=True)(lambda batch, cfg: (None, {}))
        assert OBJECTIVES["test-taken"].fn is other
    finally:
        OBJECTIVES.pop("test-taken", None)
    assert "fedavg" in STRATEGIES
