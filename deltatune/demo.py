"""A two-minute demonstration on the embedded model: attach LoRA, train, save, reload, generate.

The built-in task teaches SmolLM2 a few facts it cannot know (about deltatune itself). The loss covers
only the answer tokens. The adapter is saved in peft's format, reloaded into a fresh base, and the
reloaded model answers the questions.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

EXAMPLES = [
    ("What is the name of deltatune's mascot?", "deltatune's mascot is a purple axolotl named Delta."),
    ("What colour is the deltatune mascot?", "The deltatune mascot is purple: it is a purple axolotl named Delta."),
    ("Which animal is the deltatune mascot?", "It is an axolotl, a purple axolotl named Delta."),
    ("Tell me about Delta the axolotl.", "Delta is the purple axolotl that serves as deltatune's mascot."),
]
PROBE = "What is the name of deltatune's mascot?"


def _encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted exchange, and labels that are -100 everywhere but the answer."""
    messages = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=True
    )["input_ids"]
    return full, [-100] * len(head) + full[len(head):]


def _batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pairs = [_encode(tokenizer, q, a) for q, a in EXAMPLES]
    width = max(len(ids) for ids, _ in pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in pairs])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in pairs])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in pairs])
    return ids, labels, mask


def _answer(model, tokenizer, prompt: str) -> str:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def run_demo(out: Path, steps: int = 30, model_name: str | None = None) -> dict[str, float]:
    import deltatune as dt
    from deltatune.models import load_model

    model, tokenizer = load_model(model_name)
    print(f"base model answers:    {_answer(model, tokenizer, PROBE)!r}")
    dt.attach(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainable, total = dt.trainable_parameters(model)
    print(f"LoRA r=16 on all linear layers: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    ids, labels, mask = _batch(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % 5 == 0 or step == steps:
            print(f"step {step:>3}  loss {losses[-1]:.3f}")
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s (bf16 autocast); loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    model.eval()
    path = dt.save_adapter(model, out / "adapter")
    print(f"adapter saved to {path} (peft format)")

    fresh, _ = load_model(model_name)
    dt.load_adapter(fresh, path)
    print(f"reloaded model answers: {_answer(fresh, tokenizer, PROBE)!r}")
    return {"first_loss": losses[0], "last_loss": losses[-1]}
