"""Command line: ``lesft train | eval | generate | distill | sweep | report | demo | server | client | join | export |
audit``.

Configuration = defaults <- YAML file (``--config``) <- command-line flags, e.g.::

    lesft train --config configs/demo.yaml --method splitlora --rounds 8 --lora.r 16

Each subcommand is one block below: ``_X_args(parser)`` declares its flags, ``_X(args) -> exit code``
runs it, and one line of :data:`COMMANDS` registers both. Heavy modules (torch, transformers) are
imported inside the runners, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, NamedTuple, Sequence

from lesft.config import TRAIN_SECTIONS, TrainConfig
from lesft.flags import add_dataclass_args
from lesft.typed import build_config, did_you_mean, from_dict, load_yaml


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    aliases: tuple[str, ...] = ()


PLUGIN_HELP = ("--plugin FILE_OR_MODULE (anywhere on the line, repeatable; also $LESFT_PLUGINS): import a .py file "
               "or module that registers a loss or an aggregation strategy first (docs/extending.md).")


def _overrides(args: argparse.Namespace, own: tuple[str, ...]) -> dict[str, Any]:
    """The dataclass flags the user typed (every flag defaults to SUPPRESS), without the command's own."""
    return {k: v for k, v in vars(args).items() if k not in own + ("command",)}


def _mb(n: int | float) -> str:
    return f"{n / 2**20:.1f} MB"


# ---------------------------------------------------------------- train


_USAGE = "%(prog)s [--config FILE.yaml] [--FIELD VALUE ...] [--GROUP.FIELD VALUE ...]"


def _train_args(p: argparse.ArgumentParser) -> None:
    p.usage = _USAGE
    p.add_argument("--config", help="YAML file of TrainConfig fields (the flags below override it)")
    add_dataclass_args(p, TrainConfig, sections=TRAIN_SECTIONS)


def _config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of ``lesft train`` (also ``server`` / ``client``) arguments."""
    return build_config(TrainConfig, args.config, _overrides(args, ("config",)))


def _train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from lesft.train import train

    s = train(cfg)
    b = s["comm_bytes"]
    print(f"done: final loss {s['final_loss']:.4f}; client->server {_mb(b['client_to_server'])}, server->client "
          f"{_mb(b['server_to_client'])}, client<->aggregator "
          f"{_mb(b['client_to_aggregator'] + b['aggregator_to_client'])}; wall {s['wall_s']:.1f} s -> {cfg.out}"
          + (f"; accuracy {s['accuracy']:.1%}" if "accuracy" in s else ""))
    return 0


# ---------------------------------------------------------------- eval


def _eval_args(p: argparse.ArgumentParser) -> None:
    from lesft.config import EvalConfig

    p.add_argument("--run", help="a `lesft train` output directory (its model, adapter and dataset)")
    p.add_argument("--model", help="base model (alias, hub id, directory or .gguf); default: the run's")
    p.add_argument("--adapter", help="peft adapter directory; default: RUN/adapter, none without --run")
    add_dataclass_args(p, EvalConfig)


def _eval(args: argparse.Namespace) -> int:
    from lesft.evaluate import EvalConfig, run_eval

    cfg = from_dict(EvalConfig, _overrides(args, ("run", "model", "adapter")), source="command line")
    r = run_eval(cfg, model=args.model, adapter=args.adapter, run_dir=args.run)
    lo, hi = r["ci95"]
    print(f"{r['dataset']}/{r['split']} ({r['mode']}): accuracy {r['accuracy']:.1%} "
          f"[95% CI {lo:.1%}, {hi:.1%}] on {r['n']} questions -> {r['out']}")
    return 0


# ---------------------------------------------------------------- generate


def _generate_args(p: argparse.ArgumentParser) -> None:
    from lesft.flags import _parse_bool
    from lesft.generation import GenerateConfig

    p.add_argument("--run", required=True, help="a `lesft train` output directory (model, split, adapter)")
    p.add_argument("--adapter", help="peft adapter directory; default: RUN/adapter")
    add_dataclass_args(p, GenerateConfig)
    for flag, what in (("label_privacy", "U-shaped: the client holds the final norm and head and picks the tokens"),
                       ("chat_template", "wrap prompts in the tokenizer's chat template")):
        p.add_argument(f"--{flag}", dest=flag, type=_parse_bool, nargs="?", const=True, default=None,
                       metavar="BOOL", help=f"{what} (default: as the run trained)")


def _generate(args: argparse.Namespace) -> int:
    from lesft.generation import GenerateConfig, run_generate

    own = ("run", "adapter", "label_privacy", "chat_template")
    run_generate(from_dict(GenerateConfig, _overrides(args, own), source="command line"), args.run, args.adapter,
                 args.label_privacy, args.chat_template)
    return 0


# ---------------------------------------------------------------- distill


def _distill_args(p: argparse.ArgumentParser) -> None:
    from lesft.distill import DistillConfig

    add_dataclass_args(p, DistillConfig)


def _distill(args: argparse.Namespace) -> int:
    from lesft.distill import DistillConfig, run_distill

    r = run_distill(from_dict(DistillConfig, _overrides(args, ()), source="command line"))
    print(f"kept {r['kept']}/{r['questions']} teacher completions ({r['kept_fraction']:.1%}) -> {r['out']}"
          f"  (train with --target teacher:{r['out']})")
    return 0


# ---------------------------------------------------------------- sweep, report


def _sweep_args(p: argparse.ArgumentParser) -> None:
    from lesft import sweep

    sweep.add_arguments(p)


def _sweep(args: argparse.Namespace) -> int:
    from lesft import sweep

    return sweep.command(args)


def _report_args(p: argparse.ArgumentParser) -> None:
    from lesft import report

    report.add_arguments(p)


def _report(args: argparse.Namespace) -> int:
    from lesft import report

    return report.command(args)


# ---------------------------------------------------------------- demo


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.usage = _USAGE
    p.add_argument("--config", default=None, help="YAML file of TrainConfig fields (default: built-in demo)")
    p.add_argument("--methods", nargs="+", default=None, help="methods to compare (default: sl splitlora "
                                                               "splitfrozen lesft)")
    add_dataclass_args(p, TrainConfig, sections=TRAIN_SECTIONS)


def _demo(args: argparse.Namespace) -> int:
    from lesft.demo import DEMO_DEFAULTS, DEMO_METHODS, run_demo

    base = build_config(TrainConfig, args.config, _overrides(args, ("config", "methods")), DEMO_DEFAULTS)
    run_demo(base, args.methods or DEMO_METHODS)
    return 0


# ---------------------------------------------------------------- join (was: merge), export


def _join_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", help="adapter directories, e.g. runs/client0/adapter runs/server/adapter")
    p.add_argument("--out", required=True, help="directory of the joined adapter (refused if it holds one)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")


def _join(args: argparse.Namespace) -> int:
    from lesft.lora import join_adapters

    print(f"joined {len(args.adapters)} adapter parts -> {join_adapters(args.adapters, args.out, args.overwrite)}")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="a `lesft train` output directory (its model and RUN/adapter)")
    p.add_argument("--model", help="base model (alias, hub id, directory or .gguf); default: the run's")
    p.add_argument("--adapter", help="peft adapter directory; default: RUN/adapter")
    p.add_argument("--out", required=True, help="directory of the merged model (refused if it holds one)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")


def _export(args: argparse.Namespace) -> int:
    from lesft.lora import export_merged

    out = export_merged(args.out, run_dir=args.run, model=args.model, adapter=args.adapter, overwrite=args.overwrite)
    print(f"merged model -> {out}  (load it with AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


# ---------------------------------------------------------------- server, client (lesft.deploy)


def _server_args(p: argparse.ArgumentParser) -> None:
    from lesft.deploy import cli as deploy_cli

    deploy_cli.add_server_arguments(p)


def _server(args: argparse.Namespace) -> int:
    from lesft.deploy import cli as deploy_cli

    return deploy_cli.run_server(args)


def _client_args(p: argparse.ArgumentParser) -> None:
    from lesft.deploy import cli as deploy_cli

    deploy_cli.add_client_arguments(p)


def _client(args: argparse.Namespace) -> int:
    from lesft.deploy import cli as deploy_cli

    return deploy_cli.run_client(args)


def _device_args(p: argparse.ArgumentParser) -> None:
    from lesft.deploy import device

    device.add_arguments(p)


def _device(args: argparse.Namespace) -> int:
    from lesft.deploy import device

    return device.main(args)


def _plan_args(p: argparse.ArgumentParser) -> None:
    from lesft import plan

    plan.add_arguments(p)


def _plan(args: argparse.Namespace) -> int:
    from lesft import plan

    return plan.main(args, from_dict(TrainConfig, load_yaml(args.config)))


def _audit_args(p: argparse.ArgumentParser) -> None:
    from lesft.audit.run import AuditConfig

    p.add_argument("--config", help="YAML file of AuditConfig fields")
    add_dataclass_args(p, AuditConfig)


def _audit(args: argparse.Namespace) -> int:
    from lesft.audit.run import audit_config, run_audit

    run_audit(audit_config(load_yaml(args.config) if args.config else {}, _overrides(args, ("config",))))
    return 0


COMMANDS: dict[str, Command] = {
    "train": Command("train one method; writes config, metrics, summary and adapter to --out", _train_args, _train),
    "eval": Command("accuracy of a base model + adapter (or a training run) on a benchmark", _eval_args, _eval),
    "generate": Command("complete prompts through the split, as deployed: the client part and the server part "
                        "of a run in this process, each with its own KV cache", _generate_args, _generate),
    "distill": Command("teacher chain-of-thought targets, kept where the answer is correct", _distill_args, _distill),
    "sweep": Command("grid of trainings (+ evaluations) from a YAML spec; resumable", _sweep_args, _sweep),
    "report": Command("tables + figures of a sweep directory -> DIR/report.md, runs.csv, figures/",
                      _report_args, _report),
    "demo": Command("the embedded default: several methods on SmolLM2-135M + synthetic data, then a table",
                    _demo_args, _demo),
    "join": Command("one peft adapter from the client and server parts of a networked run (not peft's "
                    "merge_and_unload: see `lesft export`)", _join_args, _join, aliases=("merge",)),
    "export": Command("a full model with the adapter merged in (save_pretrained; loads with plain transformers)",
                      _export_args, _export),
    "server": Command("the split server as a gRPC service (networked split training)", _server_args, _server),
    "client": Command("one client of a networked run, against `lesft server`", _client_args, _client),
    "device": Command("a device's long-lived trainer for the Flower ClientApp: keeps the model loaded between "
                      "rounds (docs/deploy.md)", _device_args, _device),
    "plan": Command("bytes per round and the expected round time per party on a link (4g, 3g, wifi, lan or your "
                    "own), from a config and a measured compute time per row", _plan_args, _plan),
    "audit": Command("privacy audit: what a curious split server reconstructs, per split point and defence "
                     "-> OUT/audit.md (see docs/privacy.md)", _audit_args, _audit),
}

_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, ConnectionError)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``lesft`` parser; with ``only`` just that subcommand's flags are built (fast ``--help``)."""
    parser = argparse.ArgumentParser(prog="lesft", epilog=PLUGIN_HELP, description=__doc__.split("\n\n")[0] + "\n\n" +
                                     __doc__.split("\n\n")[1] + "\n\n    " + __doc__.split("\n\n")[2].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, c in COMMANDS.items():
        p = sub.add_parser(name, help=c.help, description=c.help, aliases=list(c.aliases))
        if only is None or only == name or only in c.aliases:
            c.add_arguments(p)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse; an unknown flag gets "did you mean" (lesft's name for a trl/peft/transformers flag, or the
    closest one)."""
    names = {n for name, c in COMMANDS.items() for n in (name, *c.aliases)}
    first = next((a for a in argv if a in names), "")  # "": `lesft --help` builds no subcommand's flags
    parser = build_parser(first)
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        known = [o.lstrip("-") for a in sub._actions for o in a.option_strings]
        hints = [f"{e}{did_you_mean(e, known)}" for e in extra if e.startswith("--")]
        sub.error("unrecognized arguments: " + " ".join(extra) + ("; " + "; ".join(hints) if hints else ""))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)  # --plugin anywhere on the line, kept out of every namespace
    pre.add_argument("--plugin", action="append", default=[])
    plugins, rest = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    args = _parse(rest)
    run = next(c.run for name, c in COMMANDS.items() if args.command in (name, *c.aliases))
    try:
        from lesft.plugins import load_plugins

        load_plugins(plugins.plugin)  # before the config is built: a plugin may register a loss or a strategy
        return run(args)
    except KeyboardInterrupt as e:  # lesft.interrupt.Interrupted says how to resume
        print(f"\nlesft: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except _ERRORS as e:
        print(f"lesft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
