"""`lesft plan`: the bytes it predicts from a config equal what a run meters, and a hand computation; the round
time follows its stated formula on a hand-worked profile."""

from __future__ import annotations

import json

import pytest
import yaml

from lesft import plan
from lesft.config import TrainConfig
from lesft.typed import from_dict
from lesft.deploy.netem import Profile
from lesft.train import train


def _cfg(assets, tmp_path, **over) -> TrainConfig:
    base = dict(method="lesft", model=str(assets / "model"), data=str(assets / "rows.jsonl"), clients=2, rounds=3,
                aggregate_every=2, grad_accum=2, client_layers="1", max_length=256, pad_to_multiple=16,
                device="cpu", progress=False, lora={"r": 4, "alpha": 8, "dropout": 0.0}, out=str(tmp_path / "run"))
    base.update(over)
    return from_dict(TrainConfig, base)


@pytest.mark.parametrize("over", [{}, {"method": "splitlora"}, {"method": "sl", "wire_dtype": "int8", "pack_ints": True},
                                  {"method": "splitfrozen", "frozen_cache_mb": 64, "rounds": 6, "aggregate_every": 0}],
                         ids=["lesft", "splitlora", "sl-int8-packed", "splitfrozen-cached"])
def test_planned_bytes_equal_the_metered_run(assets, tmp_path, over) -> None:
    cfg = _cfg(assets, tmp_path, **over)
    t = plan.traffic(cfg)
    summary = train(cfg)
    got = summary["comm_bytes"]
    assert sum(map(sum, t.up)) == got["client_to_server"]
    assert sum(map(sum, t.down)) == got["server_to_client"]
    aggs = -(-summary["rounds"] // cfg.aggregate_every) if cfg.aggregate_every else 0  # the last round too
    assert t.adapter * aggs * cfg.clients == got["client_to_aggregator"]


def test_payload_by_hand(assets, tmp_path) -> None:
    """splitlora, fp32, batch 1: each upload carries T x H fp32 activations and three int64 [1, T] tensors (mask,
    positions, labels), T = the row's token count rounded up to 16; each gradient T x H fp32."""
    from lesft.data.rows import load_rows
    from lesft.data.samples import build_sample
    from lesft.roles import DataStream
    from lesft.train import split_clients
    from transformers import AutoTokenizer

    cfg = _cfg(assets, tmp_path, method="splitlora")
    hidden = json.loads((assets / "model" / "config.json").read_text())["hidden_size"]
    tok = AutoTokenizer.from_pretrained(str(assets / "model"))
    rows = load_rows(cfg.data, cfg.samples, cfg.data_seed, cfg.synthetic)
    want_up = want_down = 0
    for cid, idx in enumerate(split_clients(cfg, rows)):
        samples = [build_sample(tok, rows[j], "base", cfg.max_length, cfg.chat_template) for j in idx]
        stream = DataStream(samples, 1, seed=cfg.seed * 1000 + cid)
        for _ in range(cfg.rounds * cfg.grad_accum):
            n = len(samples[stream.next_rows()[0]].base_ids)
            t = -(-n // 16) * 16
            want_up += t * hidden * 4 + 3 * t * 8
            want_down += t * hidden * 4
    summary = train(cfg)
    detail = summary["comm_detail"]
    assert detail["client_to_server"]["activations"]["payload_bytes"] == want_up
    assert detail["server_to_client"]["activation_grad"]["payload_bytes"] == want_down
    t = plan.traffic(cfg)
    headers = (detail["client_to_server"]["activations"]["header_bytes"],
               detail["server_to_client"]["activation_grad"]["header_bytes"])
    assert (sum(map(sum, t.up)), sum(map(sum, t.down))) == (want_up + headers[0], want_down + headers[1])


def test_round_time_by_hand() -> None:
    """Two devices, one micro-step a round, 1 MB up / 0.5 MB down each, device 1 with twice the rows."""
    t = plan.Traffic(up=[[1_000_000], [1_000_000]], down=[[500_000], [500_000]], rows=[[1], [2]], adapter=250_000,
                     grad_accum=1, rounds=1, aggregate_every=1)
    prof = Profile("x", down_mbit=8, up_mbit=4, rtt_ms=100)
    c = plan.Compute(client_s_per_row=0.3, server_s_per_row=0.5)
    r = plan.round_time(t, prof, c, flower_overhead_s=2.0, step_overhead_s=0.25)
    jit = 0.0  # no jitter in this profile
    up, down = 0.05 + 8e6 / 4e6 + jit, 0.05 + 4e6 / 8e6 + jit  # RTT/2 + bits / rate
    # device 1 is the slowest: fwd 0.2 + up, then down + bwd 0.4; the server computes 3 rows
    assert r["upload"] == pytest.approx(up) and r["download"] == pytest.approx(down)
    assert r["device_compute"] == pytest.approx(0.6) and r["server_compute"] == pytest.approx(1.5)
    assert r["waiting"] == pytest.approx(0.0)
    assert r["aggregation"] == pytest.approx(2.0 + 0.05 + 2e6 / 4e6 + 0.05 + 2e6 / 8e6)
    assert r["other"] == pytest.approx(0.25)
    assert r["round"] == pytest.approx(0.6 + up + 1.5 + down + 0.25 + r["aggregation"])


def test_one_way_with_loss_and_jitter_by_hand() -> None:
    """3g-like: 2 Mbit/s, RTT 100 ± 30 ms, 3 % loss (TCP bound 1448 * 8 / 0.1 * 1.22 / sqrt(0.03) = 0.816 Mbit/s)."""
    prof = Profile("x", down_mbit=2, up_mbit=2, rtt_ms=100, jitter_ms=30, loss_pct=3.0)
    bound = 1448 * 8 / 0.1 * 1.22 / 0.03 ** 0.5
    small = 30_000  # one chunk: no jitter spread; a loss among its 21 segments costs an RTT
    assert plan.one_way(small, prof, "up") == pytest.approx(0.05 + 30_000 * 8 / bound + 0.1 * (1 - 0.97 ** 21))
    big = 1_000_000  # 16 chunks of 64 KiB; the first has 46 segments
    want = 0.05 + 1_000_000 * 8 / bound + 0.015 * 15 / 17 + 0.1 * (1 - 0.97 ** 46)
    assert plan.one_way(big, prof, "down") == pytest.approx(want)
    assert plan.one_way(0, prof, "down") == 0.0


def test_plan_refuses_what_it_does_not_model(assets, tmp_path) -> None:
    with pytest.raises(ValueError, match="label_privacy"):
        plan.traffic(_cfg(assets, tmp_path, label_privacy=True))
    with pytest.raises(ValueError, match="does not split"):
        plan.traffic(_cfg(assets, tmp_path, method="fedavg"))


def test_cli_prints_every_profile(assets, tmp_path, capsys) -> None:
    from lesft.cli import main

    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({k: v for k, v in dict(method="lesft", model=str(assets / "model"),
                                                        data=str(assets / "rows.jsonl"), clients=2, rounds=2,
                                                        aggregate_every=2, client_layers="1").items()}))
    assert main(["plan", str(p), "--client-s-per-row", "0.1", "--server-s-per-row", "0.2"]) == 0
    out = capsys.readouterr().out
    for name in ("lan", "wifi", "4g", "3g"):
        assert f"| {name}:" in out
