"""Shared fixtures: a character-level tokenizer with a chat template and tiny random Llama/Qwen2 models,
so the engine's tests run in seconds and need nothing from outside."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer() -> PreTrainedTokenizerFast:
    chars = sorted(set(string.printable) - {"\x0b", "\x0c"})
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", additional_special_tokens=SPECIALS[2:])
    fast.chat_template = CHAT
    return fast


def make_model(arch: str = "llama", vocab: int = 104, layers: int = 4, hidden: int = 32, seed: int = 0,
               tie: bool = True):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                  max_position_embeddings=2048, pad_token_id=0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if arch == "qwen2":  # sliding-window attention on the layers above max_window_layers
        return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=6,
                                            max_window_layers=2)).eval()
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is 10-50x faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def assets(tmp_path_factory, tokenizer):
    """A directory with ``model/`` (tiny Llama + the char tokenizer, loadable by path) and ``rows.jsonl``."""
    import json

    d = tmp_path_factory.mktemp("assets")
    make_model("llama", layers=4, hidden=32).save_pretrained(d / "model")
    tokenizer.save_pretrained(d / "model")
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(8)))
    return d


@pytest.fixture(scope="session")
def server_model(assets, tmp_path_factory):
    """The tiny model without any tokenizer file: a server that tried to load one would fail."""
    import shutil

    d = tmp_path_factory.mktemp("server_model")
    for f in (assets / "model").iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, d / f.name)
    return d


def rows(n: int = 8, seed: int = 0) -> list[dict[str, str]]:
    """Short synthetic rows (keeps char-level sequences small)."""
    from lesft.data.synthetic import ArithmeticSpec, generate_arithmetic

    return generate_arithmetic(n, seed=seed, spec=ArithmeticSpec(min_steps=1, max_steps=1, max_value=9))


def self_signed(directory) -> tuple[str, str]:
    """A self-signed CA certificate for ``localhost`` and its key in ``directory``: (cert.pem, key.pem)."""
    import datetime
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = Path(directory)
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return str(d / "cert.pem"), str(d / "key.pem")
