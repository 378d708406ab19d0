"""Rows, dual-path samples, and the YAML + command-line configuration."""

from __future__ import annotations

import json

import pytest

from conftest import rows
from lesft.cli import build_parser, main
from lesft.config import TrainConfig
from lesft.typed import apply_overrides, from_dict
from lesft.data.prompts import reference_text
from lesft.data.rows import DataError, load_jsonl, load_rows
from lesft.data.samples import IGNORE_INDEX, build_sample, collate
from lesft.data.synthetic import ArithmeticSpec


def write(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"prompt": "2+2?", "target": "4. The answer is 4.", "reference": "2 + 2 = 4"})


@pytest.mark.parametrize("bad,msg", [
    ("{not json", r"rows\.jsonl:3: not valid JSON"),
    (json.dumps({"prompt": "p", "target": "t"}), r"rows\.jsonl:3: missing field\(s\) \['reference'\]"),
    (json.dumps({"prompt": "p", "target": 5, "reference": ""}), r"rows\.jsonl:3: field\(s\) \['target'\] must be strings"),
    (json.dumps({"prompt": " ", "target": "t", "reference": ""}), r"rows\.jsonl:3: field\(s\) \['prompt'\] are empty"),
    (json.dumps(["a"]), r"rows\.jsonl:3: expected a JSON object"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad, msg) -> None:
    p = write(tmp_path / "rows.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError, match=msg):
        load_jsonl(p)


def test_jsonl_rows_and_missing_file(tmp_path) -> None:
    p = write(tmp_path / "rows.jsonl", [GOOD, "", GOOD])
    got = load_jsonl(p)
    assert len(got) == 2 and got[0]["id"] == "rows-1" and got[1]["id"] == "rows-3"
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    p = write(tmp_path / "many.jsonl", [json.dumps({"prompt": f"q{i}", "target": "t", "reference": ""})
                                        for i in range(10)])
    a = load_rows(str(p), 4, seed=1, spec=ArithmeticSpec())
    assert len(a) == 4 and a == load_rows(str(p), 4, seed=1, spec=ArithmeticSpec())
    assert len(load_rows(str(p), 0, seed=1, spec=ArithmeticSpec())) == 10


def test_dual_path_sample_shares_the_target_and_carries_the_solution(tokenizer) -> None:
    row = rows(1)[0]
    s = build_sample(tokenizer, row, "dual", max_length=1024, chat_template=True)
    base_t = [t for t in s.base_labels if t != IGNORE_INDEX]
    ref_t = [t for t in s.ref_labels if t != IGNORE_INDEX]
    assert base_t == ref_t and tokenizer.decode(base_t).replace(" ", "") == (row["target"] + "<|im_end|>").replace(" ", "")
    assert s.base_ids[-len(base_t):] == base_t and s.ref_ids[-len(ref_t):] == ref_t
    ref_prompt = tokenizer.decode(s.ref_ids[: len(s.ref_ids) - len(ref_t)]).replace(" ", "")
    assert reference_text(row["prompt"], row["reference"]).replace(" ", "") in ref_prompt
    assert len(s.ref_ids) - len(ref_t) > len(s.base_ids) - len(base_t)
    only_ref = build_sample(tokenizer, row, "reference", max_length=1024, chat_template=True)
    assert only_ref.base_ids == s.ref_ids and only_ref.ref_ids is None
    assert build_sample(tokenizer, row, "base", max_length=1024, chat_template=True).ref_ids is None


def test_truncation_keeps_target_identical_in_both_paths(tokenizer) -> None:
    row = rows(1)[0]
    s = build_sample(tokenizer, row, "dual", max_length=120, chat_template=True)
    assert len(s.base_ids) <= 120 and len(s.ref_ids) <= 120
    base_t = [t for t in s.base_labels if t != IGNORE_INDEX]
    assert base_t == [t for t in s.ref_labels if t != IGNORE_INDEX] and 0 < len(base_t) <= 60


def test_collate_pads_right_to_a_multiple(tokenizer) -> None:
    samples = [build_sample(tokenizer, r, "dual", 1024, True) for r in rows(3)]
    b = collate(samples, pad_id=0, pad_to_multiple=64)
    assert b.ids.shape[1] % 64 == 0 and b.ref_ids.shape[1] % 64 == 0
    for i, s in enumerate(samples):
        n = len(s.base_ids)
        assert b.mask[i].sum() == n and b.mask[i, :n].all()
        assert b.ids[i, :n].tolist() == s.base_ids and (b.labels[i, n:] == IGNORE_INDEX).all()


def test_yaml_then_cli_overrides(tmp_path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("method: splitlora\nrounds: 3\nlora:\n  r: 4\nlesft:\n  p_sal: 0.9\n")
    args = build_parser().parse_args(["train", "--config", str(y), "--rounds", "7", "--lora.alpha", "32",
                                      "--client-layers", "1/3", "--wire_dtype", "bf16", "--split", "false"])
    from lesft.cli import _config

    cfg = _config(args)
    assert (cfg.method, cfg.rounds, cfg.lora.r, cfg.lora.alpha, cfg.lesft.p_sal) == ("splitlora", 7, 4, 32, 0.9)
    assert (cfg.client_layers, cfg.wire_dtype, cfg.split, cfg.clients) == ("1/3", "bf16", False, 4)


def test_config_errors_name_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown config field 'lora.rank'.*known fields: r, alpha"):
        from_dict(TrainConfig, {"lora": {"rank": 3}})
    with pytest.raises(ValueError, match="wire_dtype"):
        TrainConfig(wire_dtype="int3")
    assert apply_overrides({"a": {"b": 1}}, {"a.c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys) -> None:
    bad = write(tmp_path / "bad.jsonl", [GOOD, "{oops"])
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nomodel")]) == 2
    err = capsys.readouterr().err
    # the data is read before the model is loaded: the bad row is the error, not the missing model
    assert "lesft: error:" in err and "bad.jsonl:2" in err and "nomodel" not in err
    assert main(["train", "--method", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_demo_yaml_matches_builtin_defaults() -> None:
    from pathlib import Path

    from lesft.typed import load_yaml
    from lesft.demo import DEMO_DEFAULTS

    assert load_yaml(Path(__file__).parents[1] / "configs" / "demo.yaml") == DEMO_DEFAULTS


def test_every_config_field_has_help() -> None:
    import argparse

    from lesft.flags import add_dataclass_args

    p = argparse.ArgumentParser()
    add_dataclass_args(p, TrainConfig)
    actions = [a for a in p._actions if a.dest != "help"]
    assert len(actions) > 40
    missing = [a.dest for a in actions if not a.help or a.help.startswith(" (default")]
    assert missing == []
