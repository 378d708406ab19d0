"""Label-private (U-shaped) split, in process: same training as the standard split, no labels on the wire."""

from __future__ import annotations

import pytest
import torch

from test_engine import H, T, make_run, run_all
from lesft.messages import Activations
from lesft.transport import Loopback


class Recording(Loopback):
    """Loopback that keeps the tensor names of everything the server receives."""

    def __init__(self, wire_dtype: str = "fp32") -> None:
        super().__init__(wire_dtype)
        self.to_server: list[set[str]] = []

    def send(self, msg, direction):
        out = super().send(msg, direction)
        if direction == "client_to_server":
            names = set()
            for side in ("base", "reference"):
                pb = getattr(out, side, None)
                if pb is not None:
                    names |= {f"{side}.{k}" for k, v in vars(pb).items() if v is not None}
            self.to_server.append(names | ({"grad"} if hasattr(out, "grad") else set()))
        return out


def lora(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("method", ["splitlora", "lesft"])
def test_label_private_trains_like_the_standard_split(method, tokenizer, tmp_path) -> None:
    std = make_run(method, tokenizer, tmp_path / "std", rounds=2, aggregate_every=1)
    run = make_run(method, tokenizer, tmp_path / "lp", rounds=2, aggregate_every=1, label_privacy=True)
    rec = Recording()
    run.transport = run.link.transport = rec
    for a, b in zip(run_all(std), run_all(run)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        if method == "lesft":
            assert a["token_classes"]["frac_salient"] == pytest.approx(b["token_classes"]["frac_salient"])
    for c_std, c_lp in zip(std.clients, run.clients):
        for k, v in lora(c_std.bottom).items():
            torch.testing.assert_close(lora(c_lp.bottom)[k], v, atol=1e-5, rtol=1e-4)
    for k, v in lora(std.server.top).items():
        torch.testing.assert_close(lora(run.server.top)[k], v, atol=1e-5, rtol=1e-4)
    # the server never received a label tensor
    assert rec.to_server and not any(n.endswith(".labels") for names in rec.to_server for n in names)


def test_label_private_extra_bytes_are_the_last_layer_round_trip(tokenizer, tmp_path) -> None:
    """Per micro-step and client: standard = h up + dh down; U-shape adds h_L down + dh_L up (and the
    reference's h_L down for lesft), minus the labels: hand-computed from B=1, T, H fp32."""
    std = make_run("sl", tokenizer, tmp_path / "std", rounds=1)
    lp = make_run("sl", tokenizer, tmp_path / "lp", rounds=1, label_privacy=True)
    run_all(std), run_all(lp)
    s, p = std.transport.meter.to_dict(), lp.transport.meter.to_dict()
    steps = 2 * 2  # clients x grad_accum
    hidden = T * H * 4
    ints = T * 8  # one int64 [1, T] tensor
    assert s["client_to_server"]["activations"]["payload_bytes"] == steps * (hidden + 3 * ints)
    assert p["client_to_server"]["activations"]["payload_bytes"] == steps * (hidden + 2 * ints)  # no labels
    assert p["server_to_client"]["activations"]["payload_bytes"] == steps * hidden
    assert p["client_to_server"]["activation_grad"]["payload_bytes"] == steps * hidden
    assert p["server_to_client"]["activation_grad"]["payload_bytes"] == s["server_to_client"]["activation_grad"][
        "payload_bytes"] == steps * hidden


def test_label_private_client_holds_the_head_and_server_has_none(tokenizer, tmp_path) -> None:
    run = make_run("lesft", tokenizer, tmp_path, rounds=1, label_privacy=True)
    c = run.clients[0]
    assert run.server.top.head is None
    # tied embeddings: the client's head is its embedding weight, not a copy
    assert c.head.lm_head.weight is c.bottom.embed_tokens.weight
    msg = c.forward(0)
    assert isinstance(msg, Activations) and msg.base.labels is None and msg.reference.labels is None
    assert msg.batch_rows == 1


def test_label_privacy_needs_a_split(tokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match="label_privacy"):
        make_run("fedavg", tokenizer, tmp_path, label_privacy=True)
