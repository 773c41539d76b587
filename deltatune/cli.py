"""`deltatune` command line: info, inspect, merge, generate, train, eval, demo.

Every subcommand loads models through `deltatune.models` (the embedded SmolLM2 when no model is named) and
adapters through `deltatune.load_adapter`, so the CLI and the Python API cannot drift apart. Errors from bad
input are printed as one line naming the flag or file, with exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from . import __version__


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
            kinds[(leaf, f"{type(module).__name__}{tuple(module.weight.shape)}", note)] += 1
    print("targetable modules (use these names in target_modules):")
    for (leaf, kind, note), count in kinds.items():
        print(f"  {leaf:<16} x{count:<4} {kind:<28} {note}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from .core.io import WEIGHTS_NAME, read_adapter

    config, tensors, metadata = read_adapter(args.adapter, allow_pickle=args.allow_pickle)
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


def _cmd_merge(args: argparse.Namespace) -> None:
    from .core.io import load_adapter
    from .core.model import merge_and_unload
    from .models import load_model

    model, tokenizer = load_model(args.base)
    load_adapter(model, args.adapter)
    merged = merge_and_unload(model, safe=True)
    out = Path(args.out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")


def _cmd_generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import TextStreamer

    from .core.io import load_adapter
    from .models import load_model
    from .train.evaluate import bf16_available

    model, tokenizer = load_model(args.base)
    if args.adapter:
        load_adapter(model, args.adapter)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_available(model))
    if not tokenizer.chat_template or args.raw:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    else:
        messages = [{"role": "user", "content": args.prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
            temperature=args.temperature or None, top_p=None, top_k=None, streamer=streamer,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )


def _cmd_train(args: argparse.Namespace) -> None:
    from .train.loop import train

    config, overrides = _split_train_argv(args.argv)
    result = train(config, overrides=overrides)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
        print(f"trained {result.steps} steps; adapter in {result.adapter_dir}, metrics in {result.metrics_path}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from .core.io import load_adapter
    from .data import load_records, tokenize
    from .models import load_model
    from .train.evaluate import bf16_available, eval_generation, eval_loss

    records = load_records(args.data)[: args.limit] if args.limit else load_records(args.data)
    model, tokenizer = load_model(args.base)
    if args.adapter:
        load_adapter(model, args.adapter)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_available(model))
    examples, report = tokenize(records, tokenizer, format=args.format, max_length=args.max_length, source=args.data)
    print(report.summary())
    stats = eval_loss(model, tokenizer, examples, batch_size=args.batch_size, bf16=bf16)
    print(f"loss         {stats['loss']:.4f} over {stats['tokens']:,} tokens")
    print(f"perplexity   {stats['perplexity']:.3f}")
    if report.format == "text":
        return
    result = eval_generation(model, tokenizer, records, max_new_tokens=args.max_new_tokens, match=args.match,
                             batch_size=args.batch_size, bf16=bf16)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning for PyTorch.")
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = "a local transformers directory or hub id (default: the embedded SmolLM2-135M-Instruct)"

    p = sub.add_parser("info", help="parameters and targetable module names of a model")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("inspect", help="method, rank, targets, parameters and size of an adapter directory")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--allow-pickle", action="store_true", help="accept a pickle adapter_model.bin (read with weights_only)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("merge", help="write a merged model directory that plain transformers loads")
    p.add_argument("--base", default=None, help=model_help)
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("generate", help="generate from a prompt (chat template applied), streamed")
    p.add_argument("--base", default=None, help=model_help)
    p.add_argument("--adapter", default=None, help="adapter directory to apply")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast where the hardware computes bf16 natively, else fp32")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "train", help="train an adapter: deltatune train [CONFIG.yaml] [--key.sub value ...]",
        description="Train an adapter. CONFIG is a YAML file of TrainConfig keys (optional); every key can be set "
        "or overridden as --key value or --section.key value, e.g. --data.train sft.jsonl --optim.lr 1e-4 "
        "--adapter.r 8 --max_steps 200 --init_adapter runs/cpt/adapter --resume true. See examples/sft.yaml.",
    )
    p.add_argument("config", nargs="?", default=None, help="YAML config file (optional)")
    p.add_argument("overrides", nargs="*", metavar="--key.sub VALUE", help="config keys to set, dotted for sections")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="loss/perplexity on a data file, and generation scored against reference answers")
    p.add_argument("--base", default=None, help=model_help)
    p.add_argument("--adapter", default=None, help="adapter directory to apply (default: the base model alone)")
    p.add_argument("--data", required=True, help="a .jsonl/.json/.parquet file of messages, prompt+completion or text records")
    p.add_argument("--match", choices=("exact", "contains", "json"), default="exact",
                   help="exact: output equals the reference; contains: the reference occurs in the output; json: the "
                   "first JSON value in the output equals the reference's (whitespace normalised for all three)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=2048, help="tokens per example for the loss (longer ones are truncated)")
    p.add_argument("--format", choices=("auto", "messages", "prompt_completion", "text"), default="auto")
    p.add_argument("--limit", type=int, default=0, help="only the first N records (0: all)")
    p.add_argument("--samples", type=int, default=3, help="generations to print")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast where the hardware computes bf16 natively")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="the demonstration: evaluate the base model, train LoRA, evaluate again on held-out data")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the tuned demo setting)")
    p.add_argument("--out", default="out/demo", help="output directory (adapter, metrics.jsonl, loss.png)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: one per idle core)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .core.config import ConfigError
    from .core.io import AdapterFileError
    from .core.targets import TargetNotFoundError
    from .data import DataError
    from .models import ModelNotFoundError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv[1:]):
        args = argparse.Namespace(command="train", func=_cmd_train, argv=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        args.func(args)
    except (AdapterFileError, ConfigError, DataError, TargetNotFoundError, ModelNotFoundError, FileNotFoundError,
            KeyError) as exc:
        print(f"deltatune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ != "TrainingDiverged":  # the loop's own, imported only by train
            raise
        print(f"deltatune {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
