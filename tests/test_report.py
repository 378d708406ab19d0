"""lesft.report: tables with hand-computed cells, figures, problems named, speed on 100 runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lesft.report import write_report
from lesft.units import MB

GRID = {"method": ["sl", "lesft"], "client_layers": ["1/2", "1/4"], "seed": [0, 1]}


def name(method: str, cl: str, seed: int) -> str:
    return f"method={method}__client_layers={cl.replace('/', '-')}__seed={seed}"


def write_sweep(root: Path, grid: dict, names: list[tuple[str, dict]], eval_spec: dict | None = None,
                run_keys: list[str] = ()) -> None:
    root.mkdir(parents=True, exist_ok=True)
    spec = {"name": "toy", "base": {"model": "tiny"}, "grid": grid, **({"eval": eval_spec} if eval_spec else {})}
    (root / "sweep.json").write_text(json.dumps({
        "name": "toy", "spec": spec, "keys": {"grid": list(grid), "runs": list(run_keys)}, "values": grid,
        "environment": {"git_commit": "abc123", "python": "3.11"},
        "sweep_wall_s": 100.0, "overhead_s": 0.5,
        "runs": [{"name": n, "overrides": ov, "status": "done"} for n, ov in names],
    }))


def write_run(root: Path, n: str, method: str, cl: str, seed: int, *, acc: tuple | None = None,
              summary: dict | str | None = "default", rounds: int = 8, token_classes: bool = False,
              paths: str | None = None) -> Path:
    d = root / n
    d.mkdir(parents=True)
    lesft = method == "lesft" and paths in (None, "dual")
    cfg = {"method": method, "client_layers": cl, "seed": seed, "batch_size": 1, "grad_accum": 2,
           "paths": paths or ("dual" if lesft else "base"), "loss": "lesft" if lesft else "ce", "device": "cpu",
           "dtype": "fp32", "wire_dtype": "fp32", "lesft": {"weighting": "adaptive"}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if summary == "default":
        summary = {
            "method": method, "model": "tiny", "dataset": "synthetic", "clients": 4, "client_layers": 1,
            "rounds": rounds, "samples_per_client": [8, 8, 8, 8], "final_loss": 1.0, "switches": {"split": True},
            "comm_bytes": {"client_to_server": 3 * MB, "server_to_client": 1.5 * MB,
                           "client_to_aggregator": 0.25 * MB, "aggregator_to_client": 0.25 * MB},
            "peak_memory_mb": {"client": 100.0, "server": 200.0},
            "latency_s": {"client": 8.0, "server": 4.0},
            "wall_s": 20.0, "resumed_from_round": None,
            "versions": {"lesft": "0.1.0", "torch": "2.13.0", "transformers": "5.0", "peft": "0.17"},
        }
    if isinstance(summary, dict):
        (d / "summary.json").write_text(json.dumps(summary))
        tc = {"frac_salient": 0.5, "frac_subsalient": 0.2, "frac_irrelevant": 0.3, "mean_weight_salient": 1.5,
              "mean_weight_subsalient": 0.4, "mean_weight_irrelevant": 0.1, "mean_weight": 0.86}
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"round": r + 1, "loss": 2.0 / (r + 1), "aggregated": False, "comm_bytes": {},
                        **({"token_classes": tc} if token_classes else {})}) + "\n" for r in range(rounds)))
    elif isinstance(summary, str):
        (d / "summary.json").write_text(summary)
    if acc is not None:
        correct, n_q, lo, hi = acc
        (d / "eval").mkdir()
        (d / "eval" / "eval.json").write_text(json.dumps({
            "dataset": "synthetic", "split": "test", "mode": "generate", "n": n_q, "correct": correct,
            "accuracy": correct / n_q, "ci95": [lo, hi], "wall_s": 3.0}))
    return d


@pytest.fixture()
def toy(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    pts = [(name(m, c, s), {"method": m, "client_layers": c, "seed": s})
           for m in GRID["method"] for c in GRID["client_layers"] for s in GRID["seed"]]
    extra = "method=lesft__paths=base__loss=ce"  # an explicit `runs` point (the "base input only" ablation)
    write_sweep(root, GRID, pts + [(extra, {"method": "lesft", "paths": "base", "loss": "ce"})],
                eval_spec={"limit": 100}, run_keys=["method", "paths", "loss"])
    write_run(root, extra, "lesft", "1/4", 0, acc=(35, 100, 0.26, 0.45), paths="base")
    write_run(root, name("sl", "1/2", 0), "sl", "1/2", 0, acc=(40, 100, 0.30, 0.50))
    write_run(root, name("sl", "1/2", 1), "sl", "1/2", 1, acc=(50, 100, 0.40, 0.60))
    write_run(root, name("sl", "1/4", 0), "sl", "1/4", 0, summary=None)          # no summary, no eval
    write_run(root, name("sl", "1/4", 1), "sl", "1/4", 1, summary="{not json")   # malformed summary
    for s in (0, 1):
        write_run(root, name("lesft", "1/2", s), "lesft", "1/2", s, acc=(60, 100, 0.50, 0.70), token_classes=True)
    write_run(root, name("lesft", "1/4", 0), "lesft", "1/4", 0, acc=(30, 50, 0.46, 0.72), token_classes=True)
    write_run(root, name("lesft", "1/4", 1), "lesft", "1/4", 1, token_classes=True)  # trained, eval missing
    return root


def _row(md: str, table_head: str, label: str) -> list[str]:
    """Cells of the first row starting with ``| label |`` after the heading ``table_head``."""
    part = md.split(table_head, 1)[1]
    for line in part.splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in line.strip().strip("|").split(" | ")]
    raise AssertionError(f"no row {label!r} under {table_head!r}")


def test_tables_figures_and_problems(toy: Path, capsys) -> None:
    path = write_report(str(toy))
    md = path.read_text()
    assert path == toy / "report.md"

    # accuracy: columns are the client_layers values (seed is averaged over), rows the methods
    head = next(line for line in md.split("## Accuracy")[1].splitlines() if line.startswith("| method"))
    assert head == "| method | 1/2 | 1/4 |"
    # sl 1/2: seeds at 40% and 50% -> mean 45.0, bounds (30, 50) and (40, 60) -> mean [35, 55], sd of (40, 50) = 7.07
    # sl 1/4: no evaluated run -> an empty cell, not 0
    assert _row(md, "## Accuracy", "sl") == ["sl", "45.0 [35.0, 55.0] (n=100, 2 seeds, sd 7.1)", ""]
    # lesft 1/2: 60% twice (best of its column); lesft 1/4: one run, 30/50 = 60.0%, CI (0.46, 0.72)
    assert _row(md, "## Accuracy", "lesft") == ["lesft", "**60.0 [50.0, 70.0] (n=100, 2 seeds, sd 0.0)**",
                                                 "**60.0 [46.0, 72.0] (n=50)**"]
    # the explicit run: its own row, labelled by the keys it sets; its client_layers (1/4) from its config
    assert _row(md, "## Accuracy", "lesft (loss=ce, paths=base)")[1:] == ["", "35.0 [26.0, 45.0] (n=100)"]

    # overhead: MB per direction (2^20 bytes), busy s per epoch = 8 s / (8 rounds x 1 x 2 / 8 samples = 2 epochs);
    # rows per server step = batch 1 x grad_accum 2 x 4 clients
    cells = _row(md, "## Overhead", "lesft")
    assert cells == ["lesft", "1/2", "100.0", "200.0", "–", "3.00", "1.50", "0.25", "0.25", "5.00", "4.00", "2.00",
                     "2.00", "8", "8", "2"]
    # token classes of lesft's last round
    assert _row(md, "## LESFT token classes", "lesft")[2:9] == ["50.0", "20.0", "30.0", "1.500", "0.400", "0.100",
                                                                "0.860"]

    # problems name the missing and the malformed summary, and the missing evaluation
    problems = md.split("## Problems", 1)[1].split("## Reproducibility", 1)[0]
    assert f"`{name('sl', '1/4', 0)}`: summary.json missing" in problems
    assert f"`{name('sl', '1/4', 1)}`: malformed summary.json" in problems
    assert f"`{name('lesft', '1/4', 1)}`: eval/eval.json missing" in problems
    err = capsys.readouterr().err
    assert name("sl", "1/4", 0) in err and name("sl", "1/4", 1) in err

    # reproducibility as recorded
    repro = md.split("## Reproducibility", 1)[1]
    assert "| torch | 2.13.0 |" in repro and "`abc123`" in repro and "`cpu`" in repro and "0, 1" in repro

    # figures: split point, paths ablation (lesft: dual vs base), loss curves, accuracy vs bytes
    for f in ("accuracy_vs_client_layers.png", "ablation_paths.png", "loss_curves.png", "accuracy_vs_bytes.png"):
        p = toy / "figures" / f
        assert p.is_file() and p.stat().st_size > 1024, f
        assert f"](figures/{f})" in md
    assert not (toy / "figures" / "accuracy_vs_clients.png").exists()  # clients does not vary


def test_without_sweep_json_and_with_wilson_fallback(tmp_path: Path) -> None:
    """A plain folder of run directories: the varying keys are found from the configs; an eval.json without
    ci95 gets the Wilson interval, computed here by hand: 30 of 50 at z = 1.96 gives
    (p + z²/2n ± z √(p(1-p)/n + z²/4n²)) / (1 + z²/n) = [46.2, 72.4] %."""
    root = tmp_path / "runs"
    root.mkdir()
    write_run(root, "a", "sl", "1/2", 0, acc=(40, 100, 0.30, 0.50))
    d = write_run(root, "b", "lesft", "1/2", 0, acc=(30, 50, 0, 0))
    e = json.loads((d / "eval" / "eval.json").read_text())
    del e["ci95"]
    (d / "eval" / "eval.json").write_text(json.dumps(e))
    (root / "notes").mkdir()  # not a run: ignored
    md = write_report(str(root)).read_text()
    z, p, n = 1.96, 0.6, 50
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = (((p + z * z / (2 * n)) + s * half) / (1 + z * z / n) for s in (-1, 1))
    assert (round(100 * lo, 1), round(100 * hi, 1)) == (46.2, 72.4)
    assert _row(md, "## Accuracy", "lesft")[1] == "**60.0 [46.2, 72.4] (n=50)**"
    assert _row(md, "## Accuracy", "sl")[1] == "40.0 [30.0, 50.0] (n=100)"
    assert "notes" not in md


def test_a_field_missing_from_an_older_config_reads_as_its_default(tmp_path: Path) -> None:
    """Two seed-0 runs of one method in a plain folder: one from before ``cut_noise`` existed (its config lacks
    the field: it ran with the default, 0), one with ``cut_noise: 3``. They are two cells of one seed each, not
    one cell "of 2 seeds" (what the report printed when it read the missing field as "any value")."""
    root = tmp_path / "runs"
    root.mkdir()
    write_run(root, "old", "splitlora", "1/4", 0, acc=(40, 100, 0.30, 0.50))
    d = write_run(root, "noisy", "splitlora", "1/4", 0, acc=(20, 100, 0.13, 0.29))
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "cut_noise": 3.0}))
    md = write_report(str(root)).read_text()
    cells = [c for c in _row(md, "## Accuracy", "splitlora")[1:] if c]
    assert sorted(cells) == ["**40.0 [30.0, 50.0] (n=100)**", "20.0 [13.0, 29.0] (n=100)"], cells
    assert "2 seeds" not in md


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_report(str(tmp_path / "nope"))


def test_hundred_runs_fast(tmp_path: Path) -> None:
    root = tmp_path / "big"
    grid = {"method": ["sl", "splitlora", "lesft", "fedavg"], "client_layers": ["1/2", "1/3", "1/4", "1/5", "1/6"],
            "seed": [0, 1, 2, 3, 4]}
    pts = [(name(m, c, s), {"method": m, "client_layers": c, "seed": s})
           for m in grid["method"] for c in grid["client_layers"] for s in grid["seed"]]
    write_sweep(root, grid, pts, eval_spec={"limit": 100})
    for i, (n, ov) in enumerate(pts):
        write_run(root, n, ov["method"], ov["client_layers"], ov["seed"], acc=(i % 50 + 10, 100, 0.1, 0.3),
                  rounds=20, token_classes=ov["method"] == "lesft")
    md = write_report(str(root)).read_text()  # its speed is not a test here (a busy machine varies 10x)
    assert md.count("5 seeds") == 20 and "## Problems\n\nNone." in md


def test_ablation_figure_pools_only_runs_that_differ_in_the_key(tmp_path: Path) -> None:
    """Seen in the evidence study: NLFT mode (lesft.nlft_lambda=0.5, weighting adaptive) was pooled into the
    `adaptive` bar beside plain lesft. Each bar must hold only the runs that differ in the ablated key."""
    from lesft.report.figures import _ablation_groups
    from lesft.report.runs import _collect
    from lesft.report.tables import _layout

    root = tmp_path / "sweep"
    grid = {"seed": [0, 1], "method": ["lesft"]}
    pts = [(f"seed={s}__method=lesft", {"seed": s, "method": "lesft"}) for s in (0, 1)]
    boost = ("method=lesft__lesft.weighting=uniform-1__seed=0",
             {"method": "lesft", "lesft.weighting": "uniform=1", "seed": 0})
    nlft = ("method=lesft__lesft.nlft_lambda=0.5__seed=0", {"method": "lesft", "lesft.nlft_lambda": 0.5, "seed": 0})
    write_sweep(root, grid, pts + [boost, nlft], eval_spec={"limit": 100},
                run_keys=["method", "lesft.weighting", "seed", "lesft.nlft_lambda"])
    write_run(root, pts[0][0], "lesft", "1/4", 0, acc=(10, 100, 0.05, 0.18))
    write_run(root, pts[1][0], "lesft", "1/4", 1, acc=(14, 100, 0.08, 0.22))
    write_run(root, nlft[0], "lesft", "1/4", 0, acc=(35, 100, 0.26, 0.45))
    d = write_run(root, boost[0], "lesft", "1/4", 0, acc=(38, 100, 0.29, 0.48))
    (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("adaptive", "uniform=1"))
    problems: list[str] = []
    sweep, runs = _collect(root, problems, "eval")
    groups = _ablation_groups(runs, _layout(sweep, runs), "lesft.weighting")
    assert {v: {h: sorted(r.name for r in ms) for h, ms in g.items()} for v, g in groups.items()} == {
        "adaptive": {"lesft": sorted(n for n, _ in pts)}, "uniform=1": {"lesft": [boost[0]]}}
    # the figure is drawn from these groups: adaptive = (10 + 14) / 2 = 12 %, not (10 + 14 + 35) / 3
    md = write_report(str(root)).read_text()
    assert "](figures/ablation_lesft_weighting.png)" in md


def test_rows_per_step_counts_the_rows_behind_one_step_of_the_head() -> None:
    from lesft.report.runs import Run
    from lesft.report.tables import _rows_per_step

    def run(split: bool, clients: int, **config) -> Run:
        return Run("r", Path("."), None, config={"batch_size": 1, "grad_accum": 4, **config},
                   summary={"switches": {"split": split}, "clients": clients})

    assert _rows_per_step(run(True, 4)) == 16                         # the server: 4 clients x 1 x 4
    assert _rows_per_step(run(True, 4, clients_per_round=2)) == 8     # only the round's clients
    assert _rows_per_step(run(False, 1)) == 4                         # centralized: one party
    assert _rows_per_step(run(False, 4, batch_size=2)) == 8           # fedavg: each client its own
    assert _rows_per_step(Run("r", Path("."), None)) is None          # nothing to go on
