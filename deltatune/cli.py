"""`deltatune` command line: info, inspect, merge, generate, train, eval, demo, serve. This module builds the
parser and turns expected failures into one line; the work of each subcommand is in `deltatune.commands`.

Every subcommand loads models through `deltatune.models` (the embedded SmolLM2 when no model is named) and
adapters through `deltatune.load_adapter`, so the CLI and the Python API cannot drift apart.

Every expected failure (a bad flag, config key, file or adapter; an unusable output_dir; a full disk; a
diverged run) prints one line, `deltatune COMMAND: error: ...`, naming the flag, key or file, and exits with
status 2; Ctrl-C prints one line (for `train`: the last checkpoint and the command that resumes) and exits
with 130. Set DELTATUNE_DEBUG=1 to see the traceback instead. The fault classes are listed in docs/faults.md.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
from typing import Any, NoReturn, Sequence

from . import __version__
from .commands import (
    CommandError, cmd_demo, cmd_eval, cmd_generate, cmd_info, cmd_inspect, cmd_merge, cmd_to_lora, cmd_train,
)


def _take_threads(argv: list[str]) -> tuple[int, list[str]]:
    """`--threads N` taken out of the train arguments (it is no config key: it changes speed, not results)."""
    out, threads, i = [], 0, 0
    while i < len(argv):
        token = argv[i]
        if token == "--threads" or token.startswith("--threads="):
            value = token.partition("=")[2] if "=" in token else (argv[i + 1] if i + 1 < len(argv) else "")
            threads = _count("--threads", 0)(value)
            i += 1 if "=" in token else 2
            continue
        out.append(token)
        i += 1
    return threads, out


def _count(flag: str, low: int):
    """An argparse type: an integer >= low, else an error naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {low}, got {value}")
        return value
    return parse


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"--temperature must be a finite number >= 0 (0: greedy), got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), that name an unknown option and the nearest known one."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        self._check_options(args)
        return super().parse_args(args, namespace)

    def _check_options(self, args: list[str]) -> None:
        """Name the first unknown --option before argparse reports a missing required one instead."""
        known = self._option_string_actions
        for i, token in enumerate(args):
            if token in self._subparser_names():
                sub = self._subparser(token)
                return sub._check_options(args[i + 1:]) if sub is not None else None
            if not token.startswith("--") or token == "--":
                continue
            name = token.partition("=")[0]
            if name not in known and not (i and args[i - 1] in known and known[args[i - 1]].nargs != 0):
                near = difflib.get_close_matches(name, [o for o in known if o.startswith("--")], n=1)
                self.error(f"unknown argument {name}" + (f"; did you mean {near[0]}?" if near else ""))

    def _subparser_names(self) -> set[str]:
        action = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        return set(action.choices) if action is not None else set()

    def _subparser(self, name: str) -> _Parser | None:
        action = next(a for a in self._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices.get(name)


MODEL_HELP = "a local transformers directory or hub id (default: the embedded SmolLM2-135M-Instruct)"
THREADS_HELP = "CPU threads (default 0: one per idle core, as the demo does)"
QUANTIZE_HELP = ("nf4: the base's linear layers in 4-bit NF4 (QLoRA); gguf: in the GGUF file's own Q4_1 blocks "
                 "(lossless); auto (default): the base the adapter was trained on, as its file records; none: full "
                 "precision")


def _base_and_adapter(p: argparse.ArgumentParser, adapter_help: str, *, required: bool = False,
                      quantize_note: str = "", run: bool = True) -> None:
    """The options of the commands that load a base and an adapter (merge, generate, eval); run: also the
    precision and threads of commands that compute with it."""
    p.add_argument("--base", default=None, help=MODEL_HELP)
    p.add_argument("--adapter", required=required, default=None, help=adapter_help)
    p.add_argument("--allow-nonfinite", action="store_true", help="load an adapter holding NaN/Inf (a diverged run)")
    p.add_argument("--quantize", choices=("auto", "nf4", "gguf", "none"), default="auto",
                   help=QUANTIZE_HELP + quantize_note)
    if run:
        p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="auto: bf16 autocast where the hardware computes bf16 natively, else fp32")
        p.add_argument("--threads", type=_count("--threads", 0), default=0, help=THREADS_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deltatune", description="Parameter-efficient fine-tuning for PyTorch.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameters and targetable module names of a model", allow_abbrev=False)
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("inspect", help="method, rank, targets, parameters and size of an adapter directory",
                       allow_abbrev=False)
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--allow-pickle", action="store_true", help="accept a pickle adapter_model.bin (read with weights_only)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", help="write a merged model directory that plain transformers loads", allow_abbrev=False)
    _base_and_adapter(p, "adapter directory", required=True, quantize_note="; an NF4 base is merged into its "
                      "dequantized weights, written in full precision", run=False)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the merged model's weights")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("to-lora", help="write an adapter as a plain LoRA file peft and vLLM read (DyLoRA at DIR@rank=b, "
                       "VeRA exactly; LoHa/LoKr as a rank --rank SVD, error reported)", allow_abbrev=False)
    _base_and_adapter(p, "adapter directory (DIR@rank=4 picks a DyLoRA rank)", required=True, run=False)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rank", type=_count("--rank", 1), default=None,
                   help="rank of the truncated SVD for deltas that are not low-rank products (LoHa, LoKr)")
    p.set_defaults(func=cmd_to_lora)

    p = sub.add_parser("generate", help="generate from a prompt (chat template applied), streamed", allow_abbrev=False)
    _base_and_adapter(p, "adapter directory to apply")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="a system prompt before the user's (as the adapter was trained with)")
    p.add_argument("--max-new-tokens", type=_count("--max-new-tokens", 1), default=128)
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 means greedy")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "train", help="train an adapter: deltatune train [CONFIG.yaml] [--key.sub value ...]", allow_abbrev=False,
        description="Train an adapter. CONFIG is a YAML file of TrainConfig keys (optional); every key can be set "
        "or overridden as --key value or --section.key value, e.g. --data.train sft.jsonl --optim.lr 1e-4 "
        "--adapter.r 8 --max_steps 200 --init_adapter runs/cpt/adapter --resume true --quantize nf4 (QLoRA: a 4-bit "
        "base). See examples/sft.yaml. "
        "--threads N sets the CPU threads (default: one per idle core).",
    )
    p.add_argument("config", nargs="?", default=None, help="YAML config file (optional)")
    p.add_argument("overrides", nargs="*", metavar="--key.sub VALUE", help="config keys to set, dotted for sections")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="loss/perplexity on a data file, and generation scored against reference answers",
                       allow_abbrev=False)
    _base_and_adapter(p, "adapter directory to apply (default: the base model alone)")
    p.add_argument("--data", required=True, help="a .jsonl/.json/.parquet file of messages, prompt+completion or text records")
    p.add_argument("--match", choices=("exact", "contains", "json"), default="exact",
                   help="exact: output equals the reference; contains: the reference occurs in the output; json: the "
                   "first JSON value in the output equals the reference's (whitespace normalised for all three)")
    p.add_argument("--max-new-tokens", type=_count("--max-new-tokens", 1), default=64)
    p.add_argument("--batch-size", type=_count("--batch-size", 1), default=16)
    p.add_argument("--max-length", type=_count("--max-length", 2), default=2048,
                   help="tokens per example for the loss (longer ones are truncated)")
    p.add_argument("--format", choices=("auto", "messages", "prompt_completion", "text"), default="auto")
    p.add_argument("--limit", type=_count("--limit", 0), default=0, help="only the first N records (0: all)")
    p.add_argument("--samples", type=_count("--samples", 0), default=3, help="generations to print")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the demonstration: evaluate the base model, train LoRA, evaluate again on held-out data",
                       allow_abbrev=False)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--steps", type=_count("--steps", 1), default=None, help="optimizer steps (default: the tuned demo setting)")
    p.add_argument("--out", default="out/demo", help="output directory (adapter, metrics.jsonl, loss.png)")
    p.add_argument("--threads", type=_count("--threads", 0), default=0, help=THREADS_HELP)
    p.set_defaults(func=cmd_demo)

    from .serve.cli import add_arguments as add_serve_arguments, serve_main

    p = sub.add_parser("serve", help="an OpenAI-compatible server: one base model, many adapters in one batch",
                       allow_abbrev=False)
    add_serve_arguments(p, MODEL_HELP)
    p.set_defaults(func=serve_main)

    from .compose.cli import add_subcommands as add_compose_subcommands  # combine, lorahub

    add_compose_subcommands(sub, MODEL_HELP)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The failures a user can cause or meet (bad input, a full disk, a diverged run), shown as one line."""
    import torch

    from .core.config import ConfigError
    from .core.io import AdapterFileError
    from .core.targets import TargetNotFoundError
    from .data import DataError
    from .models import ModelNotFoundError
    from .train.checkpoint import CheckpointError
    from .train.loop import TrainingDiverged

    return (AdapterFileError, ConfigError, DataError, TargetNotFoundError, ModelNotFoundError, CheckpointError,
            TrainingDiverged, CommandError, OSError, KeyError, ImportError, ValueError,  # ValueError: the core's input checks
            getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text += f": {exc.filename}"
    return text


def _quiet_console() -> None:
    """Only deltatune's own output: transformers' loading bars, info logs and deprecation warnings off."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = argv[0] if argv and not argv[0].startswith("-") else "deltatune"
    threads = 0
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv[1:]):
        try:
            threads, rest = _take_threads(argv[1:])
        except argparse.ArgumentTypeError as exc:
            print(f"deltatune train: error: {exc}", file=sys.stderr)
            return 2
        args = argparse.Namespace(command="train", func=cmd_train, argv=rest)
    else:
        args = parser.parse_args(argv)
        threads = getattr(args, "threads", 0)
    debug = os.environ.get("DELTATUNE_DEBUG", "").strip().lower() in {"1", "true", "yes"}
    try:
        _quiet_console()
        if args.command in ("train", "eval", "generate"):  # the demo chooses its own
            from .threads import apply_threads

            line = apply_threads(threads)
            if line and os.environ.get("RANK", "0") == "0" and args.command != "generate":
                print(line, flush=True)
        args.func(args)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        detail = str(exc) if str(exc) else "interrupted"
        print(f"\ndeltatune {command}: {detail}", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not isinstance(exc, _expected_errors()):
            raise
        print(f"deltatune {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        from .threads import stop_retuning

        stop_retuning()  # the automatic count is refitted during this command only
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
