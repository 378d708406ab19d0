"""Typed configuration: small dataclasses with help text on every field, loaded from YAML and
overridden from the command line (``--rounds 8 --lora.r 16 --lesft.p_sal 0.9``).

Nested dataclasses map to dotted flags; ``None`` on a method switch means "take it from the
method preset" (see :mod:`lesft.methods`).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any

from lesft.data.registry import BENCHMARKS
from lesft.data.synthetic import ArithmeticSpec

#: TrainConfig fields that never change a run's result: owned by the sweep, free to differ between a run and its
#: resumption, and left out of a report's run keys.
FREE_FIELDS = ("out", "resume", "overwrite", "progress")

if typing.TYPE_CHECKING:
    from peft import LoraConfig


def _help(text: str, aliases: tuple[str, ...] = (), **kw: Any) -> Any:
    return field(metadata={"help": text, "aliases": aliases}, **kw)


# ---------------------------------------------------------------- option groups of TrainConfig
# LoRA (lesft.lora), the LESFT loss (lesft.loss) and evaluation (lesft.evaluate) re-export theirs from here:
# this module imports no torch, so `lesft --help` is fast.


@dataclass
class LoraArgs:
    """LoRA adapters, the same on the client and the server side (peft's LoraConfig underneath)."""

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator: the update is scaled by alpha / r."})
    dropout: float = field(default=0.2, metadata={"help": "Dropout on the LoRA input during training."})
    target_modules: list[str] = field(
        default_factory=lambda: ["gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Names of the linear modules that get adapters (matched by suffix, as in peft)."},
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module")

    def peft_config(self) -> LoraConfig:
        """peft's LoraConfig of these settings (peft imported here: this module stays torch-free)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
        )


_CLUSTER_ON_CHOICES = ("hidden", "reference")


#: The named weighting measured to do better than the paper's: its salient up-weighting only, every other token at
#: weight 1 (= ``uniform=1``). docs/evidence.md: +26 points over ``adaptive`` on SmolLM2-135M (test and validation).
BOOST = "boost"


def _parse_weighting(value: str) -> float | None:
    """Parse ``LossConfig.weighting``: ``"adaptive"`` -> ``None``; ``"uniform=c"`` -> ``c``; ``"boost"`` -> 1.

    Raises ``ValueError`` (naming the field) for anything else, or for ``c`` not finite / < 0.
    """
    if not isinstance(value, str):
        raise ValueError(f"LossConfig.weighting must be a string, got {value!r}")
    v = value.strip().lower()
    if v == "adaptive":
        return None
    if v == BOOST:
        return 1.0
    if v.startswith("uniform="):
        try:
            c = float(v[len("uniform="):])
        except ValueError:
            raise ValueError(
                f"LossConfig.weighting: cannot parse the constant in {value!r} "
                "(expected 'adaptive', 'boost' or 'uniform=c' with c a float, e.g. 'uniform=0.5')"
            ) from None
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"LossConfig.weighting: uniform weight must be finite and >= 0, got {value!r}")
        return c
    raise ValueError(f"LossConfig.weighting must be 'adaptive', 'boost' or 'uniform=c' (c a float), got {value!r}")


@dataclass
class LossConfig:
    """Configuration of the LESFT loss (defaults follow the paper; ``tau`` see ``docs/loss.md``)."""

    weighting: str = field(
        default="adaptive",
        metadata={
            "help": (
                "Token weighting scheme. 'adaptive' (the LESFT loss): salient, sub-salient and "
                "irrelevant tokens get their adaptive weights. 'uniform=c' (c a float >= 0; the "
                "paper's Table 3 ablation, c in {0, 0.25, 0.5, 0.75, 1, 1.5, 2}): salient tokens "
                "keep their adaptive weight 1 + ((p~ - p_sal)/(1 - p_sal))^gamma_salient and every "
                "NON-salient target token (sub-salient or irrelevant) gets the constant weight c. "
                "'boost' (= uniform=1): the salient up-weighting alone, no token below weight 1; on "
                "SmolLM2-135M / synthetic it answered 24 points more problems than 'adaptive' and as many "
                "as plain cross-entropy (3 seeds; docs/evidence.md)."
            )
        },
    )
    p_sal: float = field(
        default=0.95,
        metadata={"help": "Saliency threshold on the reference-path probability p~: a token is salient iff p~ > p_sal. In (0, 1)."},
    )
    gamma_salient: float = field(
        default=5.0,
        metadata={"help": "gamma_1 (> 0): salient weight 1 + ((p~ - p_sal)/(1 - p_sal))^gamma_1, in (1, 2]."},
    )
    gamma_subsalient: float = field(
        default=0.3,
        metadata={"help": "gamma_2 (> 0): sub-salient weight (p~/p_sal)^gamma_2, in [0, 1]."},
    )
    gamma_irrelevant: float = field(
        default=0.6,
        metadata={"help": "gamma_3 (> 0): irrelevant weight (p~/p_sal)^gamma_3, in [0, 1]."},
    )
    tau: float = field(
        default=0.8,
        metadata={
            "help": (
                "Cosine-similarity threshold in [-1, 1]: a non-salient token is sub-salient iff its "
                "hidden state has cosine >= tau with the hidden state of some salient token of the "
                "same sample. 0.8 because final hidden states of decoder LMs are anisotropic "
                "(SmolLM2-135M: median pairwise cosine ~0.55 within a sample, 0.8 ~ its 95th "
                "percentile), so a lower value would mark most tokens as sub-salient."
            )
        },
    )
    window: int = field(
        default=0,
        metadata={
            "help": (
                "Cluster window in target-token index. 0 = the whole target span; w > 0 = only "
                "tokens within w target positions of a salient centre (|i - j| <= w) can join its cluster."
            )
        },
    )
    cluster_on: str = field(
        default="hidden",
        metadata={
            "help": (
                "Which final hidden states (the input of the LM head, detached) are clustered by cosine "
                "similarity, at the position that predicts each target token (hidden[b, t-1] for the "
                "target labels[b, t]). 'hidden': the BASE path's, the one trained. 'reference': the "
                "reference path's, the one whose probabilities p~ mark the salient tokens (the paper "
                "does not say which path; this is the ablation)."
            )
        },
    )
    nlft_lambda: float = field(
        default=0.0,
        metadata={
            "help": (
                "NLFT-compatible mode. 0 = off (loss = L_weighted). > 0: "
                "L_total = lambda * (CE + L_weighted), CE = plain token-mean cross-entropy on the base path."
            )
        },
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.p_sal, (int, float)) and 0.0 < float(self.p_sal) < 1.0):
            raise ValueError(f"LossConfig.p_sal must be in (0, 1), got {self.p_sal!r}")
        for name in ("gamma_salient", "gamma_subsalient", "gamma_irrelevant"):
            g = getattr(self, name)
            if not (isinstance(g, (int, float)) and math.isfinite(g) and g > 0):
                raise ValueError(f"LossConfig.{name} must be a finite number > 0, got {g!r}")
        if not (isinstance(self.tau, (int, float)) and -1.0 <= float(self.tau) <= 1.0):
            raise ValueError(f"LossConfig.tau must be in [-1, 1], got {self.tau!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"LossConfig.window must be an int >= 0, got {self.window!r}")
        if self.cluster_on not in _CLUSTER_ON_CHOICES:
            raise ValueError(f"LossConfig.cluster_on must be one of {_CLUSTER_ON_CHOICES}, got {self.cluster_on!r}")
        if not (isinstance(self.nlft_lambda, (int, float)) and math.isfinite(self.nlft_lambda) and self.nlft_lambda >= 0):
            raise ValueError(f"LossConfig.nlft_lambda must be a finite number >= 0, got {self.nlft_lambda!r}")
        _parse_weighting(self.weighting)

    @property
    def gammas(self) -> tuple[float, float, float]:
        """``(gamma_salient, gamma_subsalient, gamma_irrelevant)``."""
        return (float(self.gamma_salient), float(self.gamma_subsalient), float(self.gamma_irrelevant))

    @property
    def uniform_weight(self) -> float | None:
        """The constant ``c`` of ``weighting="uniform=c"``, or ``None`` for ``"adaptive"``."""
        return _parse_weighting(self.weighting)


#: Default stop strings. Special tokens among them (``<|im_end|>`` ...) that the tokenizer knows as one
#: added token become extra end-of-sequence ids; the rest are matched on the decoded new text. EOS
#: always stops too. ``"\n\n\n"`` ends the runaway blank-line loops small models fall into, and
#: ``"\nQuestion:"`` the "next few-shot question" a model writes after its answer without a chat template.
DEFAULT_STOP: tuple[str, ...] = ("\n\n\n", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "</s>", "\nQuestion:")

#: Datasets with lettered options (the only ones ``mode="loglik"`` accepts).
MC_DATASETS = tuple(n for n, b in BENCHMARKS.items() if b.answer_kind == "choice")  # the built-in ones
KNOWN_DATASETS = BENCHMARKS  # every registered benchmark (lesft.data.registry), plugins included


@dataclass
class Rho1Config:
    """Rho-1 selective loss (``--loss rho1``, see lesft/objectives/rho1.py and docs/loss.md)."""

    ratio: float = field(default=0.6, metadata={"help": (
        "Share of each slice's target tokens trained on: those of largest excess loss over the frozen base "
        "(current loss - frozen loss). In (0, 1]; 0.6 as the paper's 1B math model.")})

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"rho1.ratio must be in (0, 1], got {self.ratio}")


@dataclass
class EvalConfig:
    """Everything ``lesft eval`` needs besides the model (and adapter or run directory)."""

    dataset: str | None = _help(
        "Benchmark: gsm8k, commonsenseqa, aqua_rat or synthetic. Unset: the run's own dataset when it is one "
        "of these, else synthetic.",
        default=None,
    )
    split: str = _help("Split of the benchmark (e.g. test; CommonsenseQA's labelled one is dev).", default="test")
    data_dir: str | None = _help(
        "Folder holding the benchmark files (None: the project's default data location).", default=None
    )
    file: str | None = _help("Read the questions from this file instead of the benchmark's default one.", default=None)
    limit: int = _help(
        "Number of questions (0 = all); a seeded sample (see --seed) when smaller than the split.", default=200
    )
    batch_size: int = _help(
        "Questions per generation batch (loglik: scored sequences per forward pass).", default=16
    )
    max_new_tokens: int = _help("Most tokens generated per question (generate mode).", default=256)
    chat_template: bool = _help(
        "Wrap prompts in the tokenizer's chat template when it has one (as in training). With a run "
        "directory, a run trained without it turns it off.",
        default=True,
    )
    mode: str = _help(
        "'generate' (greedy generation + answer extraction) or 'loglik' (multiple choice only: pick the "
        "option letter L maximising log P(\"The answer is (L).\" | prompt)).",
        default="generate",
    )
    stop: list[str] = _help(
        "Stop strings: generation of a question ends at EOS or at the first of these; the completion is cut "
        "before it. Special tokens in the list (e.g. <|im_end|>) act as extra EOS ids.",
        default_factory=lambda: list(DEFAULT_STOP),
    )
    choice_template: str = _help(
        "Loglik mode: the sentence scored after the prompt for each option ({letter} is replaced).",
        default="The answer is ({letter}).",
    )
    seed: int = _help("Seed of the question sample (when --limit is smaller than the split).", default=0)
    split_inference: bool = _help(
        "Generate through the split, as deployed (needs a run directory): the client part with its LoRA and the "
        "server part with the server LoRA, each with its own KV cache, linked by a counting loopback; eval.json "
        "gets the measured cost under 'inference'. Label-private runs pick the tokens on the client.",
        default=False,
    )
    device: str = _help(
        "Where the model answers: cpu, cuda or auto (cuda when available). Split inference runs on the CPU.",
        default="auto",
    )
    progress: bool = _help("Show a progress bar over the questions.", default=True)
    out: str | None = _help(
        "Folder for predictions.jsonl and eval.json (None: RUN_DIR/eval with a run directory, else nothing "
        "is written).",
        default=None,
    )

    def __post_init__(self) -> None:
        if self.mode not in ("generate", "loglik"):
            raise ValueError(f"mode must be 'generate' or 'loglik', got {self.mode!r}")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0 (0 = all), got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu, cuda[:i] or auto, got {self.device!r}")
        if self.split_inference and self.mode != "generate":
            raise ValueError("split_inference runs mode 'generate' only")
        if "{letter}" not in self.choice_template:
            raise ValueError(f"choice_template must contain '{{letter}}', got {self.choice_template!r}")


@dataclass
class TrainConfig:
    """Everything ``lesft train`` needs. Switches left at ``None`` come from the method preset."""

    method: str = _help(
        "Method preset: centralized, fedavg, sl, splitlora, splitfrozen, lesft, dft or rho1.", default="lesft"
    )
    model: str = _help(
        "Model: alias 'smollm2-135m', a Hugging Face hub id, a local model directory or a .gguf file.",
        default="smollm2-135m",
    )
    data: str = _help(
        "Training data (alias --dataset): a benchmark (synthetic, gsm8k, commonsenseqa, aqua_rat: its train "
        "split) or a JSONL file of {prompt, target, reference} rows.",
        default="synthetic", aliases=("dataset",),
    )
    data_dir: str | None = _help(
        "Folder with the benchmarks' official files (gsm8k/, commonsenseqa/, aqua/); default $LESFT_DATA_DIR, "
        "then ../shared/data, then the Hugging Face hub.", default=None
    )
    target: str = _help(
        "Target source for benchmarks: 'dataset' (its own rationale) or 'teacher:FILE' (JSONL of {id, completion}).",
        default="dataset",
    )
    rationale: str | None = _help(
        "CommonsenseQA rationale source for targets and references: ecqa (default), palm, cose or none.", default=None
    )
    samples: int = _help(
        "Training rows in total across clients, a seeded sample (0 = every row). For 'synthetic', the number generated.",
        default=256,
    )
    partition: str = _help(
        "How rows are split across clients: 'iid' (seeded, near-equal) or 'dirichlet:ALPHA' (non-IID over answer "
        "labels, or prompt-length quartiles for numeric tasks; smaller ALPHA = more skew).", default="iid"
    )
    per_client: int = _help(
        "Rows per client, disjoint (the paper's 10..50 sample-size study); 0 = split all rows by --partition.",
        default=0,
    )
    clients: int = _help("Number of clients (edge devices). Ignored by 'centralized' (one party).", default=4)
    clients_per_round: int = _help(
        "Clients sampled per round (FedAvg's C x N; seeded by --seed and the round, so resumable); 0 = all. "
        "Aggregation averages the clients that trained since the last one. Rounds from --epochs grow by "
        "clients / clients_per_round, so that an epoch is still one pass over each client's data in expectation.",
        default=0,
    )
    share_base: bool = _help(
        "Simulation: all clients share one copy of the frozen base weights and own only their LoRA, optimizer "
        "state and data (false: a deep copy per client; the same numbers at N times the memory).", default=True
    )
    client_layers: str = _help(
        "Decoder layers kept on the client: a count ('7') or a fraction of all layers ('1/4').", default="1/4"
    )
    rounds: int = _help("Training rounds (one optimizer step per party each). 0 = derive from --epochs.", default=0)
    epochs: float = _help(
        "Passes over the largest client's data; used when --rounds is 0.", default=1.0
    )
    lr: float = _help("AdamW learning rate, the same for client and server adapters.", default=5e-5)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    batch_size: int = _help("Samples per client per micro-batch.", default=1)
    grad_accum: int = _help("Micro-batches per client accumulated into one round (one optimizer step).", default=4)
    max_length: int = _help(
        "Longest token sequence per path; longer prompts are cut from the left, then targets from the right.",
        default=320,
    )
    pad_to_multiple: int = _help(
        "Pad every batch to a multiple of this many tokens (fewer distinct shapes; matters for bf16 on CPU).",
        default=32,
    )
    chat_template: bool = _help("Wrap prompts in the tokenizer's chat template when it has one.", default=True)
    # --- method switches (None: from the preset) ---
    split: bool | None = _help("Split the model between clients and a server (False: every party holds it whole).", default=None)
    client_trainable: bool | None = _help("Clients train LoRA on their layers (False: frozen, forward only).", default=None)
    aggregate_every: int | None = _help(
        "Aggregate client adapters every I rounds, weighted by |D_i| (0 = never).", default=None
    )
    aggregation: str = _help(
        "How client adapters are combined: fedavg (every tensor averaged), ffa (FFA-LoRA: A frozen at its "
        "initialisation, B averaged), fedsa (FedSA-LoRA: A averaged, B kept per client, one adapter exported "
        "per client) or a name registered with lesft.strategies.register_strategy.", default="fedavg"
    )
    paths: str | None = _help(
        "Inputs used: 'base' (x), 'dual' (x and the forward-only reference x~ = x + solution) or 'reference' (train on x~).",
        default=None,
    )
    reference: str = _help(
        "What the reference input x~ adds to the prompt: 'solution' (the row's reference solution; for synthetic "
        "rows bare equations, or a worded solution in another voice with --synthetic.reference_style worded) or "
        "'target' (the target text itself, so every target token can be copied on the reference path).",
        default="solution")
    loss: str | None = _help(
        "Loss: 'ce' (token-mean cross-entropy), 'lesft' (token-weighted, needs paths=dual) or a name registered "
        "with lesft.objectives.register_objective.", default=None)
    label_privacy: bool = _help(
        "U-shaped split: the client also holds the final norm and LM head and computes the loss, so the "
        "server receives hidden states only, never target ids (two exchanges per micro-step).", default=False
    )
    cut_noise: float = _help(
        "Privacy defence: Gaussian noise added by each client to the cut activations it sends (both paths), "
        "sigma relative to each token's RMS, so 1.0 = as much noise as signal (0 = off; see docs/privacy.md).",
        default=0.0,
    )
    # --- system ---
    server_chunk_rows: int = _help(
        "Rows the split server runs through its layers, head and loss at once: a step over more rows (all "
        "clients' micro-batches together) goes in chunks whose gradients add up to the same single optimizer step, "
        "so the server's memory is bounded by a chunk, not by the number of clients. 0 = all rows at once. "
        "Equal to the unchunked step within float tolerance (with LoRA dropout the masks are drawn in another order).",
        default=8)
    head_chunk_tokens: int = _help(
        "Target positions the LM head and the loss take at once (losses registered with logprobs=True: ce, lesft): "
        "the [rows, T, V] logits never exist, only [chunk, V], computed again in backward (checkpointed); the head "
        "runs on target positions only. 0 = the whole logits of a chunk of rows at once (what other losses get). "
        "Equal to 0 within float tolerance (bit-equal in the runs checked on CPU).", default=1024)
    wire_dtype: str = _help(
        "Format of activations and gradients on the wire: fp32, bf16, fp16 (casts), int8 or int4 (symmetric, one "
        "fp32 scale per block of 64 values; lossy, see docs/deploy.md). --reference_wire and --grad_wire override it "
        "for the reference path and the gradients.", default="fp32")
    reference_wire: str = _help(
        "Format of the reference path's activations (forward-only, so it may take fewer bits), e.g. int4; "
        "'' = as --wire_dtype.", default="")
    grad_wire: str = _help("Format of the gradients (both directions); '' = as --wire_dtype.", default="")
    frozen_cache_mb: float = _help(
        "Client layers frozen (splitfrozen): the split server keeps the cut activations of each batch it received, up "
        "to this many MiB (least recently used first out), and a client sends a batch it sent before as a short "
        "reference; on a miss (evicted, or a restarted server) the server asks for the tensors again. Exactly the same "
        "training as resending; with batch_size 1 every epoch after the first sends references only. 0 = off.",
        default=0.0)
    pack_ints: bool = _help(
        "Send the batch's integer tensors packed, losslessly: attention masks as row lengths, position ids "
        "0..T-1 as nothing, labels as each row's target span in the narrowest integer type (off: int64 tensors, "
        "as before this option).", default=False)
    dtype: str = _help(
        "Compute precision: fp32, or bf16 (autocast; on CPU the weights stay fp32).", default="fp32"
    )
    device: str = _help("cpu, cuda or auto.", default="auto")
    seed: int = _help("Seed of the LoRA init, dropout and the order in which each client reads its rows.", default=0)
    data_seed: int | None = _help(
        "Seed of the training sample (synthetic: the generated rows) and of its partition across clients; "
        "unset = --seed. Vary --seed alone for new inits on the same rows, --data_seed alone for new rows.",
        default=None,
    )
    out: str = _help("Run directory: config.yaml, metrics.jsonl, summary.json, adapter/.", default="runs/lesft")
    progress: bool = _help("Show a progress bar.", default=True)
    checkpoint_every: int = _help(
        "Write a checkpoint (adapters, optimizer and RNG states, data position, meters) every K rounds "
        "and after the last one (0 = only after the last).", default=10
    )
    resume: bool = _help(
        "Continue the run in --out from its last checkpoint (a finished run is not retrained).", default=False
    )
    overwrite: bool = _help("Start afresh even if --out already holds a run (its files are replaced).", default=False)
    eval: bool = _help(
        "After training, evaluate the exported adapter (settings: --evaluation.*) and put accuracy into "
        "summary.json.", default=False
    )
    # --- nested groups ---
    lora: LoraArgs = _help("LoRA settings.", default_factory=LoraArgs)
    lesft: LossConfig = _help("LESFT loss settings.", default_factory=LossConfig)
    rho1: Rho1Config = _help("Rho-1 selective loss settings (--loss rho1).", default_factory=Rho1Config)
    synthetic: ArithmeticSpec = _help("Difficulty and reference form of the built-in synthetic data.",
                                       default_factory=ArithmeticSpec)
    evaluation: EvalConfig = _help("Evaluation after training (with --eval).", default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name in ("clients", "batch_size", "grad_accum", "max_length", "pad_to_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rounds < 0 or self.epochs <= 0 and self.rounds == 0:
            raise ValueError(f"need rounds >= 1 or epochs > 0 (got rounds={self.rounds}, epochs={self.epochs})")
        if self.partition != "iid":
            kind, _, alpha = self.partition.partition(":")
            try:
                ok = kind == "dirichlet" and float(alpha) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"partition must be 'iid' or 'dirichlet:ALPHA' with ALPHA > 0, got {self.partition!r}")
        if not 0 <= self.clients_per_round <= self.clients:
            raise ValueError(f"clients_per_round must be in [0, clients={self.clients}] (0 = all), "
                             f"got {self.clients_per_round}")
        if self.per_client < 0:
            raise ValueError(f"per_client must be >= 0, got {self.per_client}")
        formats = ("fp32", "bf16", "fp16", "int8", "int4")
        for name in ("wire_dtype", "reference_wire", "grad_wire"):
            value = getattr(self, name)
            if value not in formats and not (value == "" and name != "wire_dtype"):
                raise ValueError(f"{name} must be one of {', '.join(formats)}"
                                 f"{'' if name == 'wire_dtype' else ' or empty (as wire_dtype)'}, got {value!r}")
        if self.reference not in ("solution", "target"):
            raise ValueError(f"reference must be 'solution' or 'target', got {self.reference!r}")
        if self.head_chunk_tokens < 0:
            raise ValueError(f"head_chunk_tokens must be >= 0 (0 = whole logits), got {self.head_chunk_tokens}")
        if self.server_chunk_rows < 0:
            raise ValueError(f"server_chunk_rows must be >= 0 (0 = all rows at once), got {self.server_chunk_rows}")
        if self.frozen_cache_mb < 0:
            raise ValueError(f"frozen_cache_mb must be >= 0 (0 = off), got {self.frozen_cache_mb}")
        if self.frozen_cache_mb and self.cut_noise:
            raise ValueError("frozen_cache_mb with cut_noise: the noise is drawn anew for every send, so a cached "
                             "batch is not what the client would send; turn one of them off")
        if self.cut_noise < 0:
            raise ValueError(f"cut_noise must be >= 0, got {self.cut_noise}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.data_seed is None:
            self.data_seed = self.seed  # recorded resolved in config.yaml

#: ``--help`` sections of TrainConfig: the first field of each, in field order.
TRAIN_SECTIONS: dict[str, str] = {
    "method": "model and method", "data": "data", "rounds": "optimisation",
    "split": "method switches (unset: from the --method preset)", "server_chunk_rows": "system",
    "out": "output, checkpoints, evaluation",
}
