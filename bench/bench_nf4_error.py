"""How much NF4 itself costs the embedded model, before any adapter: loss on text and on the demo answers. Not a test.

    python bench/bench_nf4_error.py            # ~5 min, one thread
    python bench/bench_nf4_error.py --controls # NF4 on Gaussian weights, down/up kept in 16 bits, the inits' starts

Each variant replaces the weights of the 210 quantizable linear layers of SmolLM2-135M-Instruct by their
quantize-then-dequantize values (fp32; the same bits as `Linear4bit`, see docs/qlora.md "Format") and measures,
under bf16 autocast where the CPU has it natively:
- text: the mean next-token loss over this repository's README and docs/*.md, in chunks of 512 tokens (English
  prose with code; fixed by the commit, so the figure reproduces);
- demo answers: the teacher-forced loss per answer token on the 50 held-out demo examples (the "eval loss" of
  bench_qlora_quality.py; the untrained base, 0% exact either way).
Variants: NF4 + double quantization (QLoRA's storage), NF4 without DQ, blocksize 32, NF4 + DQ plus the rank-16
truncated SVD of the quantization residual W - Q (LoftQ's first iteration: the best rank-16 LoRA initialisation
for the weights alone), and NF4 + DQ for one projection type at a time.
Results: bench/results/nf4_error.json and nf4_error.md.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from _common import cpu_name  # bench/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main() -> None:
    from bench_qlora_quality import test_examples
    from deltatune.models import load_model
    from deltatune.quant.model import quantizable_linears
    from deltatune.quant.nf4 import dequantize_nf4, quantize_nf4
    from deltatune.train.evaluate import bf16_available, eval_loss

    torch.set_num_threads(1)
    model, tokenizer = load_model()
    bf16 = bf16_available(model)
    names = quantizable_linears(model)
    original = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    text = "\n\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    chunks = [ids[i:i + 512] for i in range(0, len(ids) - 1, 512) if len(ids[i:i + 512]) > 1]
    answers = test_examples(tokenizer)

    def text_loss() -> float:
        total = count = 0
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            for chunk in chunks:
                loss = model(chunk[None], labels=chunk[None]).loss.float().item()
                total, count = total + loss * (len(chunk) - 1), count + len(chunk) - 1
        return total / count

    def nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> torch.Tensor:
        return dequantize_nf4(quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant), torch.float32)

    def loftq1(weight: torch.Tensor, rank: int = 16) -> torch.Tensor:
        q = nf4(weight)
        u, s, vh = torch.linalg.svd(weight - q, full_matrices=False)
        return q + (u[:, :rank] * s[:rank]) @ vh[:rank]

    if "--controls" in sys.argv:
        return controls(model, names, original, text_loss, lambda: eval_loss(model, tokenizer, answers, batch_size=8,
                                                                               bf16=bf16)["loss"], nf4)
    variants = {"16-bit (bf16 compute)": lambda n: original[n],
                "NF4 + DQ (QLoRA)": lambda n: nf4(original[n]),
                "NF4, no DQ": lambda n: nf4(original[n], double_quant=False),
                "NF4 + DQ, blocksize 32": lambda n: nf4(original[n], blocksize=32),
                "NF4 + DQ + rank-16 SVD of the residual (LoftQ, 1 iteration)": lambda n: loftq1(original[n])}
    for kind in TYPES:
        variants[f"NF4 + DQ on {kind} only"] = lambda n, kind=kind: nf4(original[n]) if n.endswith(kind) else original[n]
    rows = []
    for label, weight_of in variants.items():
        for n in names:
            model.get_submodule(n).weight.data.copy_(weight_of(n))
        row = {"variant": label, "text_loss": text_loss(),
               "answer_loss": eval_loss(model, tokenizer, answers, batch_size=8, bf16=bf16)["loss"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {"cpu": cpu_name(), "torch": torch.__version__, "text_tokens": sum(len(c) - 1 for c in chunks),
            "answer_tokens": sum(sum(1 for x in e["labels"] if x != -100) for e in answers),
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nf4_error.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    base = rows[0]
    lines = [f"Measured on {meta['cpu']}, 1 thread, torch {meta['torch']}; text: {meta['text_tokens']:,} tokens of "
             f"README + docs; demo answers: {meta['answer_tokens']:,} tokens.", "",
             "| weights of the 210 linear layers | text loss | vs 16-bit | demo answer loss | vs 16-bit |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['text_loss']:.4f} | {r['text_loss'] / base['text_loss'] - 1:+.1%} | "
                     f"{r['answer_loss']:.4f} | {r['answer_loss'] / base['answer_loss'] - 1:+.1%} |")
    (RESULTS / "nf4_error.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def controls(model, names, original, text_loss, answer_loss, nf4) -> None:
    """`--controls`: NF4's relative weight error on these weights against Gaussian weights of the same shapes (per
    layer type), and the losses of: NF4 + DQ with down_proj and up_proj kept in 16 bits (bitsandbytes' skip
    list allows it), and the starting points of LoftQ and QPiSSA (2 iterations, r=16, alpha=32: Q_T + s·BA) and of
    the replace form (one SVD of the stock NF4 + DQ residual), the weights alone before any training."""
    from deltatune.methods.lora_init import _svd_split, loftq_factors, qpissa_factors

    r, s = 16, 32 / 16
    gen = torch.Generator().manual_seed(0)
    errors: dict[str, list[tuple[float, float]]] = {}
    for n in names:
        w = original[n]
        g = torch.randn(w.shape, generator=gen) * w.std()
        rel = lambda x: float((x - nf4(x)).norm() / x.norm())  # noqa: E731
        errors.setdefault(n.split(".")[-1], []).append((rel(w), rel(g)))

    def loftq(n):
        state, A, B = loftq_factors(original[n], r, s, 2)
        from deltatune.quant.nf4 import dequantize_nf4
        return dequantize_nf4(state, torch.float32) + s * (B @ A)

    def qpissa(n):
        state, A, B = qpissa_factors(original[n], r, s, 2, None, n)
        from deltatune.quant.nf4 import dequantize_nf4
        return dequantize_nf4(state, torch.float32) + s * (B @ A)

    def replace(n):
        q = nf4(original[n])
        A, B = _svd_split(original[n].double() - q.double(), r)
        return q + (B @ A).float()

    variants = {"16-bit (bf16 compute)": lambda n: original[n],
                "NF4 + DQ (QLoRA)": lambda n: nf4(original[n]),
                "NF4 + DQ, down_proj and up_proj kept in 16 bits": lambda n: original[n]
                if n.endswith(("down_proj", "up_proj")) else nf4(original[n]),
                "replace form: NF4 + DQ + rank-16 SVD of its residual": replace,
                "LoftQ start, 2 iterations (NF4 no DQ, Q_T + s·BA)": loftq,
                "QPiSSA start, 2 iterations (NF4 no DQ, Q_T + s·BA)": qpissa}
    rows = []
    for label, weight_of in variants.items():
        for n in names:
            model.get_submodule(n).weight.data.copy_(weight_of(n))
        rows.append({"variant": label, "text_loss": text_loss(), "answer_loss": answer_loss()})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"cpu": cpu_name(), "torch": torch.__version__, "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    (RESULTS / "nf4_controls.json").write_text(json.dumps({"meta": meta, "errors": errors, "rows": rows}, indent=2) + "\n")
    base, stock = rows[0], rows[1]
    lines = [f"Measured on {meta['cpu']}, 1 thread, torch {meta['torch']}; load {meta['load']} at the end.", "",
             "NF4 + DQ relative weight error ‖W − nf4(W)‖/‖W‖, mean over the 30 layers of each type:", "",
             "| layer type | SmolLM2's weights (already on the Q4_1 grid) | Gaussian weights, same shapes and std |",
             "|---|---:|---:|"]
    for kind, pairs in errors.items():
        lines.append(f"| {kind} | {sum(p[0] for p in pairs) / len(pairs):.4f} | {sum(p[1] for p in pairs) / len(pairs):.4f} |")
    lines += ["", "| weights of the 210 linear layers | text loss | vs 16-bit | share of NF4's cost left | demo answer loss |",
              "|---|---:|---:|---:|---:|"]
    for row in rows:
        left = (row["text_loss"] - base["text_loss"]) / (stock["text_loss"] - base["text_loss"])
        lines.append(f"| {row['variant']} | {row['text_loss']:.4f} | {row['text_loss'] / base['text_loss'] - 1:+.2%} | "
                     f"{left:.0%} | {row['answer_loss']:.4f} |")
    (RESULTS / "nf4_controls.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
