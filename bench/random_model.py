"""Write a randomly initialised model directory of a published shape, loadable as ``--model DIR``.

For overhead tables (memory, bytes, time) at paper scale where no weights can be downloaded: accuracy
means nothing with random weights, but shapes, bytes and FLOPs are those of the real model.

    python bench/random_model.py --shape qwen2.5-0.5b --tokenizer ../shared/models/qwen2.5-tokenizer --out DIR
    python bench/random_model.py --shape tiny-llama --tokenizer DIR_WITH_A_TOKENIZER --out DIR   # smoke tests
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

#: The published configs (hidden size, MLP width, layers, attention heads, KV heads); all tie embeddings.
SHAPES: dict[str, tuple[type, type, dict]] = {
    "qwen2.5-0.5b": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=896, intermediate_size=4864,
                                                         num_hidden_layers=24, num_attention_heads=14,
                                                         num_key_value_heads=2, vocab_size=151936)),
    "qwen2.5-1.5b": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=1536, intermediate_size=8960,
                                                         num_hidden_layers=28, num_attention_heads=12,
                                                         num_key_value_heads=2, vocab_size=151936)),
    "qwen2.5-3b": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=2048, intermediate_size=11008,
                                                       num_hidden_layers=36, num_attention_heads=16,
                                                       num_key_value_heads=2, vocab_size=151936)),
    "tiny-llama": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                                       num_attention_heads=4, num_key_value_heads=2)),
}
QWEN_COMMON = dict(max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def make(shape: str, tokenizer: str, out: Path, seed: int = 0) -> Path:
    """Save ``shape`` with random weights (seeded) and the tokenizer at ``tokenizer`` into ``out``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if (out / "config.json").is_file():
        return out  # made before: the same seed gives the same weights
    tok = AutoTokenizer.from_pretrained(tokenizer)
    config_cls, model_cls, dims = SHAPES[shape]
    extra = QWEN_COMMON if config_cls is Qwen2Config else dict(tie_word_embeddings=True)
    dims = dict(dims, vocab_size=dims.get("vocab_size", len(tok)))
    torch.manual_seed(seed)
    model = model_cls(config_cls(**dims, **extra, pad_token_id=tok.pad_token_id or 0))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", required=True, help="a directory holding a tokenizer (tokenizer.json or vocab+merges)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(make(args.shape, args.tokenizer, args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
