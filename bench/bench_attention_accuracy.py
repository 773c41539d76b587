"""How close each attention of a bf16 training step is to exact attention, on the embedded SmolLM2 and the
demo's packed SFT batch (the batch bench_train.py --workload sft times).

    python bench/bench_attention_accuracy.py          # ~1 min; writes bench/results/attention_accuracy.md

Three views, each for SDPA's bf16 kernel (what transformers runs under autocast) and deltatune.train.attention
(`attention: auto` on packed rows):
- per layer: the first layers' attention inputs as the bf16 model produces them (q and k in the rotary
  embedding's fp32, v in bf16), mean |error| of the output against fp64 attention on the same inputs; also the
  per-example attention with q and k rounded to bf16 first (its first version);
- the whole bf16 model (frozen linears in bf16, as speed mode stores them) against the fp32 model on the
  labelled positions: mean |Δ logit| and mean |Δ log-prob|;
- the first-step loss (the mean cross-entropy of the labelled tokens, no update) of the bf16 model with each
  attention, with exact attention swapped in (SDPA in fp32 on the same inputs, output rounded to bf16), and of
  the fp32 model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402  (the model, the batch and the bf16 storage bench_train uses)
from _common import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = 3


def main() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from deltatune.train import attention
    from deltatune.train.loss import causal_lm_loss
    from deltatune.train.memory import store_frozen_linears_in_bf16

    torch.set_num_threads(1)
    model, hf, _, tokenizer, _ = bench_train.build(bench_train.SETUPS["speed+sdpa"], "fp32", "random")
    batch, _ = bench_train.make_batch("sft", tokenizer, hf.config.vocab_size)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    keep = batch["labels"] != -100
    captured: list[tuple[torch.Tensor, ...]] = []

    def capture(module, q, k, v, mask, **kwargs):
        if len(captured) < LAYERS:
            captured.append((q.detach(), k.detach(), v.detach(), mask, kwargs["position_ids"]))
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    def exact_swapped_in(module, q, k, v, mask, **kwargs):
        with torch.autocast("cpu", enabled=False):
            out, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), mask, **kwargs)
        return out.bfloat16(), None

    for name, fn in (("capture", capture), ("exact_in_bf16_model", exact_swapped_in)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)
    per_example = attention.register()

    def run(implementation: str, bf16: bool) -> tuple[torch.Tensor, float]:
        hf.set_attn_implementation(implementation)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = hf(**inputs, use_cache=False).logits.float()[keep]
            total, tokens = causal_lm_loss(hf, batch, 0)
        return logits, float(total / tokens)

    fp32_logits, fp32_loss = run("sdpa", bf16=False)
    store_frozen_linears_in_bf16(hf)
    run("capture", bf16=True)
    lines = [f"# Attention accuracy in a bf16 step (bench/bench_attention_accuracy.py)", "",
             f"{cpu_name()}, torch {torch.__version__}; SmolLM2-135M, the demo's packed SFT batch 4x231.", "",
             "| layer | SDPA bf16 | per example (deltatune) | per example, q and k rounded to bf16 first |",
             "|---|---:|---:|---:|"]
    for layer, (q, k, v, mask, positions) in enumerate(captured):
        starts = attention._starts(positions.expand(q.shape[0], -1))
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                               enable_gqa=True).transpose(1, 2)
        sdpa = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask,
                                              enable_gqa=True).transpose(1, 2)
        ours = attention._per_example(q, k, v, starts, None, bf16=True)
        rounded = attention._per_example(q.bfloat16(), k.bfloat16(), v, starts, None, bf16=True)
        errors = [(x.double() - exact).abs().mean().item() for x in (sdpa, ours, rounded)]
        lines.append(f"| {layer} | " + " | ".join(f"{e:.2e}" for e in errors) + " |")
    lines += ["", "mean |error| of the attention output against fp64 attention on the same inputs", "",
              "| bf16 model with | mean abs Δ logit vs fp32 model | mean abs Δ log-prob | first-step loss |",
              "|---|---:|---:|---:|"]
    reference = fp32_logits.log_softmax(-1)
    for label, implementation in (("SDPA (bf16 kernel)", "sdpa"), ("per example (deltatune)", per_example),
                                  ("exact attention swapped in", "exact_in_bf16_model")):
        logits, loss = run(implementation, bf16=True)
        lines.append(f"| {label} | {(logits - fp32_logits).abs().mean():.4f} | "
                     f"{(logits.log_softmax(-1) - reference).abs().mean():.4f} | {loss:.4f} |")
    lines.append(f"| (the fp32 model) | 0 | 0 | {fp32_loss:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / "attention_accuracy.md").write_text(text)


if __name__ == "__main__":
    main()
