"""Command line: ``lesft train | eval | generate | distill | sweep | report | demo | server | client | merge``.

Configuration = defaults <- YAML file (``--config``) <- command-line flags, e.g.::

    lesft train --config configs/demo.yaml --method splitlora --rounds 8 --lora.r 16
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from lesft.config import TrainConfig, _parse_bool, add_dataclass_args, apply_overrides, from_dict, load_yaml
from lesft import report as report_cli
from lesft.plugins import load_plugins
from lesft import sweep as sweep_cli
from lesft.distill import DistillConfig
from lesft.evaluate import EvalConfig
from lesft.generation import GenerateConfig


def _config(args: argparse.Namespace, skip: tuple[str, ...] = ("command", "config", "methods")) -> TrainConfig:
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    return from_dict(TrainConfig, apply_overrides(data, overrides))


PLUGIN_HELP = ("--plugin FILE_OR_MODULE (anywhere on the line, repeatable; also $LESFT_PLUGINS): import a .py file "
               "or module that registers a loss or an aggregation strategy first (docs/extending.md).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesft", description=__doc__, epilog=PLUGIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one method; writes config, metrics, summary and adapter to --out")
    train.add_argument("--config", help="YAML file of TrainConfig fields")
    add_dataclass_args(train, TrainConfig)
    ev = sub.add_parser("eval", help="accuracy of a base model + adapter (or a training run) on a benchmark")
    ev.add_argument("--run", help="a `lesft train` output directory (its model, adapter and dataset)")
    ev.add_argument("--model", help="base model (alias, hub id, directory or .gguf); default: the run's")
    ev.add_argument("--adapter", help="peft adapter directory; default: RUN/adapter, none without --run")
    add_dataclass_args(ev, EvalConfig)
    gen = sub.add_parser("generate", help="complete prompts through the split, as deployed: the client part and the "
                                          "server part of a run in this process, each with its own KV cache")
    gen.add_argument("--run", required=True, help="a `lesft train` output directory (model, split, adapter)")
    gen.add_argument("--adapter", help="peft adapter directory; default: RUN/adapter")
    add_dataclass_args(gen, GenerateConfig)
    for flag, what in (("label_privacy", "U-shaped: the client holds the final norm and head and picks the tokens"),
                       ("chat_template", "wrap prompts in the tokenizer's chat template")):
        gen.add_argument(f"--{flag}", f"--{flag.replace('_', '-')}", type=_parse_bool, nargs="?", const=True,
                         metavar="BOOL", help=f"{what} (default: as the run trained)")
    dist = sub.add_parser("distill", help="teacher chain-of-thought targets, kept where the answer is correct")
    add_dataclass_args(dist, DistillConfig)
    sw = sub.add_parser("sweep", help="grid of trainings (+ evaluations) from a YAML spec; resumable")
    sweep_cli.add_arguments(sw)
    rp = sub.add_parser("report", help="tables + figures of a sweep directory -> DIR/report.md, DIR/figures/")
    report_cli.add_arguments(rp)
    demo = sub.add_parser("demo", help="the embedded default: several methods on SmolLM2-135M + synthetic data, "
                                       "then a comparison table")
    demo.add_argument("--config", default=None, help="YAML file of TrainConfig fields (default: built-in demo)")
    demo.add_argument("--methods", nargs="+", default=None, help="methods to compare (default: sl splitlora "
                                                                  "splitfrozen lesft)")
    add_dataclass_args(demo, TrainConfig)
    mg = sub.add_parser("merge", help="one peft adapter from the parts of a networked run (client + server)")
    mg.add_argument("adapters", nargs="+", help="adapter directories, e.g. runs/client0/adapter runs/server/adapter")
    mg.add_argument("--out", required=True, help="directory of the merged adapter")
    from lesft.deploy import cli as deploy_cli

    srv = sub.add_parser("server", help="the split server as a gRPC service (networked split training)")
    deploy_cli.add_server_arguments(srv)
    cl = sub.add_parser("client", help="one client of a networked run, against `lesft server`")
    deploy_cli.add_client_arguments(cl)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)  # --plugin first: its registrations are names other flags use
    pre.add_argument("--plugin", action="append", default=[])
    plugins, argv = pre.parse_known_args(argv)
    args = build_parser().parse_args(argv)
    try:
        load_plugins(plugins.plugin)
        if args.command == "train":
            from lesft.train import train

            summary = train(_config(args))
            print(f"done: final loss {summary['final_loss']:.4f}, bytes {summary['comm_bytes']}, "
                  f"wall {summary['wall_s']:.1f} s -> {_config(args).out}")
        elif args.command == "eval":
            from lesft.evaluate import run_eval

            fields = {k: v for k, v in vars(args).items() if k not in ("command", "run", "model", "adapter")}
            r = run_eval(from_dict(EvalConfig, fields), model=args.model, adapter=args.adapter, run_dir=args.run)
            lo, hi = r["ci95"]
            print(f"{r['dataset']}/{r['split']} ({r['mode']}): accuracy {r['accuracy']:.1%} "
                  f"[95% CI {lo:.1%}, {hi:.1%}] on {r['n']} questions -> {r['out']}")
        elif args.command == "generate":
            from lesft.generation import run_generate

            own = ("command", "run", "adapter", "label_privacy", "chat_template")
            fields = {k: v for k, v in vars(args).items() if k not in own}
            run_generate(from_dict(GenerateConfig, fields), args.run, args.adapter, args.label_privacy,
                         args.chat_template)
        elif args.command == "distill":
            from lesft.distill import run_distill

            r = run_distill(from_dict(DistillConfig, {k: v for k, v in vars(args).items() if k != "command"}))
            print(f"kept {r['kept']}/{r['questions']} teacher completions ({r['kept_fraction']:.1%}) -> {r['out']}"
                  f"  (train with --target teacher:{r['out']})")
        elif args.command == "sweep":
            return sweep_cli.command(args)
        elif args.command == "report":
            return report_cli.command(args)
        elif args.command == "merge":
            from lesft.lora import merge_adapters

            print(f"merged {len(args.adapters)} adapters -> {merge_adapters(args.adapters, args.out)}")
        elif args.command in ("server", "client"):
            from lesft.deploy import cli as deploy_cli

            return (deploy_cli.run_server if args.command == "server" else deploy_cli.run_client)(args)
        elif args.command == "demo":
            from lesft.demo import DEMO_DEFAULTS, DEMO_METHODS, run_demo

            data = load_yaml(args.config) if args.config else dict(DEMO_DEFAULTS)
            overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "methods")}
            base = from_dict(TrainConfig, apply_overrides(data, overrides))
            run_demo(base, args.methods or DEMO_METHODS)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, ConnectionError) as e:
        print(f"lesft: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
