"""`deltatune` command line: info, inspect, merge, generate, train, eval, demo.

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
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn, Sequence

from . import __version__


class CommandError(Exception):
    """An expected failure of a command that no more specific deltatune error describes; printed as one line."""


def _cmd_info(args: argparse.Namespace) -> None:
    from torch import nn

    from .core.targets import LINEAR_TYPES, output_head_names
    from .models import load_model

    model, _ = load_model(args.model)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    config = model.config
    print(f"model        {getattr(config, '_name_or_path', args.model)}")
    print(f"architecture {type(model).__name__} ({getattr(config, 'model_type', '?')})")
    print(f"parameters   {total:,} ({total / 1e6:.1f} M)")
    heads = output_head_names(model)
    kinds: Counter[tuple[str, str, str]] = Counter()
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES + (nn.Embedding,)):
            leaf = name.split(".")[-1]
            note = "output head, excluded from all-linear" if name in heads else ""
            kinds[(leaf, _shape(module), note)] += 1
    print("targetable modules (use these names in target_modules; shapes as PyTorch prints them):")
    for (leaf, kind, note), count in kinds.items():
        print(f"  {leaf:<16} x{count:<4} {kind:<40} {note}")
    _print_footprint(model)


def _print_footprint(model: Any) -> None:
    """What --quantize nf4 (QLoRA) would store: the quantizable linear layers in fp32, bf16, NF4, NF4 + DQ."""
    from .quant import footprint

    plan = footprint(model)
    if not plan.layers:
        print("--quantize nf4: not available for this model (no nn.Linear layers to quantize)")
        return
    print("--quantize nf4 (QLoRA) stores the linear layers but the head in 4 bits:")
    print("\n".join("  " + line for line in plan.table().splitlines()))


def _base_quantization(args: argparse.Namespace) -> str | None:
    """--quantize: "nf4", "none", or "auto": the base the adapter was trained on, as its file records."""
    if args.quantize != "auto":
        return None if args.quantize == "none" else args.quantize
    if not args.adapter:
        return None
    from safetensors import safe_open

    from .core.io import BASE_QUANTIZATION_KEY, WEIGHTS_NAME

    try:
        with safe_open(str(Path(args.adapter) / WEIGHTS_NAME), framework="pt") as f:
            recorded = (f.metadata() or {}).get(BASE_QUANTIZATION_KEY, "")
    except Exception:  # no or no readable file: load_adapter says what is wrong with it
        return None
    if not recorded.startswith("nf4"):
        return None
    print(f"deltatune: {args.adapter} was trained on an NF4 base ({recorded}): loading the base in NF4 "
          "(--quantize none for the full-precision base)", file=sys.stderr, flush=True)
    return "nf4"


def _load_base(args: argparse.Namespace, compute_dtype: Any = None) -> tuple[Any, Any]:
    """The base model (NF4 linear layers with --quantize, see `_base_quantization`) with --adapter loaded."""
    import torch

    from .core.io import load_adapter
    from .models import load_model

    if compute_dtype is None and getattr(args, "precision", "auto") != "auto":  # of the NF4 layers' matmuls
        compute_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model, tokenizer = load_model(args.base, quantize=_base_quantization(args), compute_dtype=compute_dtype)
    if args.adapter:
        load_adapter(model, args.adapter, allow_nonfinite=args.allow_nonfinite)
    return model, tokenizer


def _shape(module: Any) -> str:
    """`Linear(in_features=576, out_features=1536)`, as PyTorch's repr, for Linear, Conv1D and Embedding alike."""
    name = type(module).__name__
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return f"{name}(in_features={module.in_features}, out_features={module.out_features})"
    if hasattr(module, "num_embeddings"):
        return f"{name}({module.num_embeddings}, {module.embedding_dim})"
    d_in, d_out = module.weight.shape  # transformers' Conv1D stores W as (in, out)
    return f"{name}(in_features={d_in}, out_features={d_out})"


def _cmd_inspect(args: argparse.Namespace) -> None:
    from .core.io import BASE_QUANTIZATION_KEY, WEIGHTS_NAME, read_adapter
    from .core.registry import method_of

    config, tensors, metadata = read_adapter(args.adapter, allow_pickle=args.allow_pickle)
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and hasattr(v, "numel") for k, v in tensors.items()):
        raise CommandError(f"{args.adapter}: the weights file does not hold a mapping of tensor names to tensors")
    root = Path(args.adapter)
    size = sum(f.stat().st_size for f in root.iterdir() if f.is_file())
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in tensors})
    params = sum(t.numel() for t in tensors.values())
    print(f"method       {config.peft_type}")
    for field in ("r", "lora_alpha", "use_rslora", "lora_dropout", "bias"):
        if hasattr(config, field):
            print(f"{field:<12} {getattr(config, field)}")
    print(f"targets      {config.target_modules}")
    print(f"base model   {config.base_model_name_or_path}")
    print(f"modules      {len(modules)} adapted (e.g. {modules[0] if modules else '-'})")
    print(f"parameters   {params:,} in {len(tensors)} tensors")
    print(f"file size    {size / 1e6:.2f} MB ({WEIGHTS_NAME if (root / WEIGHTS_NAME).exists() else 'pickle'})")
    print(f"written by   deltatune {metadata['deltatune_version']}" if "deltatune_version" in metadata else "written by   peft (or another tool)")
    if metadata.get(BASE_QUANTIZATION_KEY):
        print(f"trained on   a {metadata[BASE_QUANTIZATION_KEY]} base (QLoRA); loads onto the full-precision base too")
    print(f"readable by  {', '.join(method_of(config).readers_for(config))}")


def _cmd_merge(args: argparse.Namespace) -> None:
    import torch

    from .core.model import merge_and_unload
    from .quant import check_full_precision, dequantize_model

    # An NF4 base dequantizes in fp32: the adapter's delta is added to the weights it was trained on, exactly.
    model, tokenizer = _load_base(args, compute_dtype=torch.float32)
    try:
        merged = merge_and_unload(model, safe=True)
    except (ValueError, RuntimeError) as exc:  # a NaN/Inf merged weight, a method that cannot merge
        raise CommandError(f"--adapter {args.adapter}: cannot merge: {exc}") from None
    dequantize_model(merged, torch.float32)  # NF4 layers the adapter did not touch
    check_full_precision(merged, "deltatune merge")
    merged.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    out = Path(args.out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")


def _cmd_generate(args: argparse.Namespace) -> None:
    from transformers import TextStreamer

    from .train.evaluate import bf16_available, generate_batch, prompt_ids

    model, tokenizer = _load_base(args)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_available(model))
    if args.system is not None and (args.raw or not tokenizer.chat_template):
        raise CommandError("--system needs the chat template: drop --raw" if args.raw else
                           "--system: this model's tokenizer has no chat template; put the instruction in --prompt")
    ids = prompt_ids(tokenizer, args.prompt, system=args.system, raw=args.raw)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    text = generate_batch(model, tokenizer, [ids], max_new_tokens=args.max_new_tokens, bf16=bf16,
                          temperature=args.temperature, streamer=streamer)[0]
    if not text.strip():
        print("(the model generated no text)", file=sys.stderr)


def _cmd_train(args: argparse.Namespace) -> None:
    from .train.loop import TrainingInterrupted, train

    config, overrides = _split_train_argv(args.argv)
    try:
        result = train(config, overrides=overrides)
    except TrainingInterrupted as exc:
        command = shlex.join(["deltatune", "train", *_without_resume(args.argv), "--resume", "true"])
        where = f"the last checkpoint is {exc.checkpoint} (step {exc.step}); resume with: {command}" if exc.checkpoint \
            else "no checkpoint was written yet"
        raise TrainingInterrupted(f"interrupted; nothing else was saved; {where}", exc.step, exc.checkpoint) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
        print(f"trained {result.steps} steps; adapter in {result.adapter_dir}, metrics in {result.metrics_path}")


def _without_resume(argv: Sequence[str]) -> list[str]:
    """The train arguments without any --resume flag (the resume command adds its own)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif not token.startswith("--resume="):
            out.append(token)
    return out


def _cmd_eval(args: argparse.Namespace) -> None:
    from .data import load_records, tokenize
    from .train.evaluate import bf16_available, eval_generation, eval_loss

    records = load_records(args.data)[: args.limit] if args.limit else load_records(args.data)
    model, tokenizer = _load_base(args)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_available(model))
    examples, report = tokenize(records, tokenizer, format=args.format, max_length=args.max_length, source=args.data)
    print(report.summary(), flush=True)
    stats = eval_loss(model, tokenizer, examples, batch_size=args.batch_size, bf16=bf16, progress=True)
    print(f"loss         {stats['loss']:.4f} over {stats['tokens']:,} tokens")
    print(f"perplexity   {stats['perplexity']:.3f}")
    if report.format == "text":
        return
    result = eval_generation(model, tokenizer, records, max_new_tokens=args.max_new_tokens, match=args.match,
                             batch_size=args.batch_size, bf16=bf16, progress=True)
    if not result["n"]:
        print("generation   skipped: no record has a reference answer")
        return
    correct = sum(s["correct"] for s in result["samples"])
    print(f"{args.match + ' match':<12} {result['score']:.1%} ({correct}/{result['n']}, greedy, whitespace-normalised)")
    for sample in result["samples"][: args.samples]:
        print(f"  {'ok ' if sample['correct'] else 'no '} reference {sample['reference']!r}\n      output    {sample['output']!r}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(out=Path(args.out), steps=args.steps, model_name=args.model, threads=args.threads)


def _split_train_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """`train [CONFIG] [--key.sub value ...]`: the config path (a first token that is not an option), then overrides.

    Done by hand because argparse would take the value of `--data.train x.jsonl` for the positional CONFIG.
    """
    from .core.config import ConfigError

    config, rest = (argv[0], list(argv[1:])) if argv and not argv[0].startswith("-") else (None, list(argv))
    if rest and not rest[0].startswith("--"):
        raise ConfigError(f"expected one CONFIG file, then options like --optim.lr 1e-4; got a second file {rest[0]!r}")
    return config, rest


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deltatune", description="Parameter-efficient fine-tuning for PyTorch.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = "a local transformers directory or hub id (default: the embedded SmolLM2-135M-Instruct)"
    threads_help = "CPU threads (default 0: one per idle core, as the demo does)"
    quantize_help = ("nf4: the base's linear layers in 4-bit NF4 (QLoRA); auto (default): NF4 if the adapter was "
                     "trained on an NF4 base, as its file records; none: full precision")

    p = sub.add_parser("info", help="parameters and targetable module names of a model", allow_abbrev=False)
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("inspect", help="method, rank, targets, parameters and size of an adapter directory",
                       allow_abbrev=False)
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--allow-pickle", action="store_true", help="accept a pickle adapter_model.bin (read with weights_only)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("merge", help="write a merged model directory that plain transformers loads", allow_abbrev=False)
    p.add_argument("--base", default=None, help=model_help)
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--allow-nonfinite", action="store_true", help="load an adapter holding NaN/Inf (a diverged run)")
    p.add_argument("--quantize", choices=("auto", "nf4", "none"), default="auto", help=quantize_help +
                   "; an NF4 base is merged into its dequantized weights, written in full precision")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the merged model's weights")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("generate", help="generate from a prompt (chat template applied), streamed", allow_abbrev=False)
    p.add_argument("--base", default=None, help=model_help)
    p.add_argument("--adapter", default=None, help="adapter directory to apply")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="a system prompt before the user's (as the adapter was trained with)")
    p.add_argument("--max-new-tokens", type=_count("--max-new-tokens", 1), default=128)
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 means greedy")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--allow-nonfinite", action="store_true", help="load an adapter holding NaN/Inf (a diverged run)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast where the hardware computes bf16 natively, else fp32")
    p.add_argument("--quantize", choices=("auto", "nf4", "none"), default="auto", help=quantize_help)
    p.add_argument("--threads", type=_count("--threads", 0), default=0, help=threads_help)
    p.set_defaults(func=_cmd_generate)

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
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="loss/perplexity on a data file, and generation scored against reference answers",
                       allow_abbrev=False)
    p.add_argument("--base", default=None, help=model_help)
    p.add_argument("--adapter", default=None, help="adapter directory to apply (default: the base model alone)")
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
    p.add_argument("--allow-nonfinite", action="store_true", help="load an adapter holding NaN/Inf (a diverged run)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast where the hardware computes bf16 natively")
    p.add_argument("--quantize", choices=("auto", "nf4", "none"), default="auto", help=quantize_help)
    p.add_argument("--threads", type=_count("--threads", 0), default=0, help=threads_help)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="the demonstration: evaluate the base model, train LoRA, evaluate again on held-out data",
                       allow_abbrev=False)
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--steps", type=_count("--steps", 1), default=None, help="optimizer steps (default: the tuned demo setting)")
    p.add_argument("--out", default="out/demo", help="output directory (adapter, metrics.jsonl, loss.png)")
    p.add_argument("--threads", type=_count("--threads", 0), default=0, help=threads_help)
    p.set_defaults(func=_cmd_demo)

    from .serve.cli import add_arguments as add_serve_arguments, serve_main

    p = sub.add_parser("serve", help="an OpenAI-compatible server: one base model, many adapters in one batch",
                       allow_abbrev=False)
    add_serve_arguments(p, model_help)
    p.set_defaults(func=serve_main)
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
        args = argparse.Namespace(command="train", func=_cmd_train, argv=rest)
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
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
