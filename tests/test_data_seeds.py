"""data_seed draws the rows, seed the init (each varies alone), and the contamination check catches a
planted overlap: a test problem re-told with other names and objects inside a run's training rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lesft.cli import main
from lesft.data.benchmarks import load_benchmark
from lesft.data.contamination import TRAIN_KEYS_FILE, problem_keys, write_train_keys
from lesft.report import write_report

TINY = ["--synthetic.min_steps", "1", "--synthetic.max_steps", "1", "--synthetic.max_value", "9"]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Three runs at lr 0 (the exported adapter is the initial one): (seed, data_seed) = (0, 0), (1, 0), (0, 1)."""
    d = tmp_path_factory.mktemp("seeds")
    out = {}
    for seed, data_seed in ((0, 0), (1, 0), (0, 1)):
        o = d / f"s{seed}d{data_seed}"
        args = ["train", "--model", str(assets / "model"), "--data", "synthetic", "--samples", "4", *TINY,
                "--method", "splitlora", "--clients", "2", "--rounds", "1", "--grad_accum", "1", "--lr", "0",
                "--client_layers", "1", "--progress", "false", "--device", "cpu", "--out", str(o),
                "--seed", str(seed), "--data_seed", str(data_seed)]
        assert main(args) == 0
        out[(seed, data_seed)] = o
    return out


def _rows(o: Path) -> list[str]:
    return json.loads((o / TRAIN_KEYS_FILE).read_text())["keys"]


def _adapter(o: Path) -> dict:
    return load_file(str(o / "adapter" / "adapter_model.safetensors"))


def test_seed_alone_changes_the_init_not_the_rows(runs) -> None:
    a, b = runs[(0, 0)], runs[(1, 0)]
    assert _rows(a) == _rows(b)
    ta, tb = _adapter(a), _adapter(b)
    assert any(not (ta[k] == tb[k]).all() for k in ta if "lora_A" in k)


def test_data_seed_alone_changes_the_rows_not_the_init(runs) -> None:
    a, c = runs[(0, 0)], runs[(0, 1)]
    assert _rows(a) != _rows(c)
    ta, tc = _adapter(a), _adapter(c)
    assert all((ta[k] == tc[k]).all() for k in ta)
    summary = json.loads((c / "summary.json").read_text())
    assert (summary["seed"], summary["data_seed"]) == (0, 1)


def test_problem_keys_see_through_names_and_objects() -> None:
    row = load_benchmark("synthetic", "test", n=1, seed=0)[0]
    retold = {**row, "prompt": "Zoe has some pears. " + row["prompt"]}
    assert problem_keys(row)[1] == problem_keys(retold)[1]  # the equations' key
    assert problem_keys(row)[0] != problem_keys(retold)[0]  # the prompt's key
    assert len(problem_keys({"prompt": "Q?", "reference": "Because."})) == 1  # not synthetic: prompt only


def _run(root: Path, name: str, method: str, preds: list[dict], train_rows: list[dict]) -> tuple[str, dict]:
    d = root / name
    (d / "eval").mkdir(parents=True)
    (d / "config.yaml").write_text(json.dumps({"method": method, "seed": 0}))
    (d / "eval" / "eval.json").write_text(json.dumps({"dataset": "synthetic", "split": "test", "mode": "generate",
                                                     "n": len(preds), "correct": 0, "accuracy": 0.0}))
    (d / "eval" / "predictions.jsonl").write_text("".join(
        json.dumps({"id": r["id"], "correct": False, "keys": problem_keys(r)}) + "\n" for r in preds))
    write_train_keys(train_rows, d / TRAIN_KEYS_FILE)
    return name, {"method": method}


def test_contamination_check_catches_a_planted_overlap(tmp_path: Path) -> None:
    test = load_benchmark("synthetic", "test", n=20, seed=0)
    clean = load_benchmark("synthetic", "train", n=50, seed=3)
    planted = clean[:-1] + [{**test[7], "prompt": test[7]["prompt"].replace(" has ", " owns ", 1), "id": "p"}]
    names = [_run(tmp_path, "a", "lesft", test, clean), _run(tmp_path, "b", "splitlora", test, planted)]
    (tmp_path / "sweep.json").write_text(json.dumps({
        "name": "c", "spec": {"eval": {}}, "keys": {"grid": ["method"]}, "values": {"method": ["lesft", "splitlora"]},
        "runs": [{"name": n, "overrides": ov, "status": "done"} for n, ov in names]}))
    md = write_report(str(tmp_path)).read_text()
    section = md.split("## Contamination", 1)[1].split("##", 1)[0]
    assert "20 distinct evaluated problems" in section and "**1 overlap**" in section
    assert test[7]["id"] in section and "`b`" in section and "`a`" not in section
    assert "contamination: 1 evaluated problem(s)" in md.split("## Problems", 1)[1]

    (tmp_path / "b" / TRAIN_KEYS_FILE).unlink()
    write_train_keys(clean, tmp_path / "b" / TRAIN_KEYS_FILE)
    md = write_report(str(tmp_path)).read_text()
    assert "**no overlap**" in md.split("## Contamination", 1)[1]
