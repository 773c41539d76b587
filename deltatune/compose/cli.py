"""`deltatune combine` and `deltatune lorahub`: the subcommands over `combine_adapters` and `lorahub`.

    deltatune combine --adapter runs/a/adapter --adapter runs/b/adapter --weights 0.7 0.3 --type cat --out mix
    deltatune lorahub --adapter runs/a/adapter --adapter runs/b/adapter ... --data fewshot.jsonl --out hub \
        --budget 40 --seeds 0 1 2

Both write an ordinary adapter directory (peft's format) that `eval`, `generate`, `merge` and `serve` take;
`combine --merged DIR` also writes the base with the combination merged in, a plain transformers model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .combine import LORA_TYPES
from .lorahub import DEFAULT_BOUND, DEFAULT_BUDGET, DEFAULT_L1


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {value}")
        return value
    return parse


def add_subcommands(sub, model_help: str) -> None:
    """Add `combine` and `lorahub` to the `deltatune` subparsers."""
    p = sub.add_parser("combine", help="a new adapter from weighted adapters (cat, linear, svd, ties, dare_*, ...)",
                       allow_abbrev=False)
    p.add_argument("--base", default=None, help=model_help)
    p.add_argument("--adapter", action="append", required=True, help="an adapter directory (repeat, in weight order)")
    p.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per --adapter")
    p.add_argument("--type", dest="combination_type", choices=LORA_TYPES, default=None,
                   help="LoRA: peft's combination_type (default svd) or lorahub; IA3: linear (the default)")
    p.add_argument("--svd-rank", type=_positive_int("--svd-rank"), default=None)
    p.add_argument("--svd-clamp", type=float, default=None, help="quantile in (0, 1] at which SVD factors are clamped")
    p.add_argument("--density", type=float, default=None, help="kept fraction for ties, dare_*, magnitude_prune")
    p.add_argument("--majority-sign-method", choices=("total", "frequency"), default="total")
    p.add_argument("--seed", type=int, default=None, help="DARE's random drop")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--merged", default=None, help="also write the base with the combination merged in (a plain "
                   "transformers model directory) here")
    p.set_defaults(func=cmd_combine)

    p = sub.add_parser("lorahub", help="LoRAHub: weights for several LoRAs searched on a few examples of a new task",
                       allow_abbrev=False)
    p.add_argument("--base", default=None, help=model_help)
    p.add_argument("--adapter", action="append", required=True, help="a candidate LoRA directory (repeat)")
    p.add_argument("--data", required=True, help="the few-shot examples (5-20 records: messages or prompt+completion)")
    p.add_argument("--budget", type=_positive_int("--budget"), default=DEFAULT_BUDGET,
                   help=f"objective evaluations per seed (default {DEFAULT_BUDGET})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="search seeds; the best objective wins")
    p.add_argument("--l1", type=float, default=DEFAULT_L1, help=f"λ of the mean-|w| penalty (default {DEFAULT_L1})")
    p.add_argument("--bound", type=float, default=DEFAULT_BOUND, help=f"weights in [-bound, bound] (default {DEFAULT_BOUND})")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast where the hardware computes bf16 natively, else fp32")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.set_defaults(func=cmd_lorahub)


def cmd_combine(args: argparse.Namespace) -> None:
    from ..core.io import save_adapter
    from ..models import load_model
    from .combine import combine_adapters

    if len(args.weights) != len(args.adapter):
        raise ValueError(f"--weights gives {len(args.weights)} numbers for {len(args.adapter)} --adapter directories")
    model, tokenizer = load_model(args.base)
    combine_adapters(model, [Path(a) for a in args.adapter], args.weights, "combined",
                     combination_type=args.combination_type, svd_rank=args.svd_rank, svd_clamp=args.svd_clamp,
                     density=args.density, majority_sign_method=args.majority_sign_method, seed=args.seed)
    out = save_adapter(model, args.out, "combined")
    print(f"combined {len(args.adapter)} adapters ({args.combination_type or 'default type'}) into {out}")
    if args.merged:
        from ..core.model import merge_and_unload, set_active

        set_active(model, "combined")
        merge_and_unload(model, safe=True).save_pretrained(args.merged)
        tokenizer.save_pretrained(args.merged)
        print(f"merged model written to {args.merged} (load it with transformers.AutoModelForCausalLM.from_pretrained)")


def cmd_lorahub(args: argparse.Namespace) -> None:
    from ..core.io import save_adapter
    from ..data import load_records
    from ..models import load_model
    from ..train.evaluate import bf16_available
    from .lorahub import lorahub

    records = load_records(args.data)
    model, tokenizer = load_model(args.base)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_available(model))
    result = lorahub(model, [Path(a) for a in args.adapter], records, "lorahub", tokenizer=tokenizer,
                     budget=args.budget, seeds=args.seeds, l1=args.l1, bound=args.bound, bf16=bf16, progress=True,
                     log=print)
    out = save_adapter(model, args.out, "lorahub")
    (Path(out) / "lorahub.json").write_text(json.dumps({
        "adapters": args.adapter, "weights": result.weights, "objective": result.objective, "loss": result.loss,
        "seed": result.seed, "runs": result.runs, "budget": args.budget, "l1": args.l1, "data": args.data}, indent=2) + "\n")
    print(f"weights {[round(w, 4) for w in result.weights]} (seed {result.seed}, few-shot loss {result.loss:.4f}); "
          f"adapter in {out}, the search in {Path(out) / 'lorahub.json'}")
