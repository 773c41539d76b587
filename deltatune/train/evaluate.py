"""Evaluation: teacher-forced loss/perplexity on a split, and generation scored against reference answers.

    stats = eval_loss(model, tokenizer, examples, batch_size=8)                 # {loss, perplexity, tokens}
    score = eval_generation(model, tokenizer, records, max_new_tokens=32, match="exact")  # {score, n, samples}

Loss is the mean next-token cross-entropy over the tokens that carry a label (the assistant turns of a chat,
the completion, or every token of text), computed with the training loss (`loss.causal_lm_loss`), so an
evaluation number and a training number mean the same thing; perplexity is exp(loss).

Generation is greedy, batched, with LEFT padding: a decoder-only model continues from the last position of
each row, so the prompts must end at the same column and the padding must sit before them (right padding
would make a short prompt continue from pad tokens). The prompt is the conversation without its final
assistant turn, rendered by the tokenizer's chat template with the generation prompt, exactly what
`deltatune generate` and training use.

Two generation paths give the same greedy tokens (in fp32; under bf16 autocast up to the order of bf16 sums):
the serving engine (`deltatune.serve.Engine`: continuous batching, so a row that has ended makes room for the
next prompt instead of idling until the longest row of its batch ends) wherever it runs the model as it
stands, else `generate_batch` (transformers' `generate()` on left-padded batches). `_engine_requests` is the
one place that chooses.

Matching, after normalisation of both strings (strip the ends, collapse every whitespace run to one space;
case and punctuation are kept, because for formatted answers they are the task):

    exact     normalised output == normalised reference
    contains  normalised reference is a substring of the normalised output
    json      the first JSON object or array found in the output, parsed, equals the parsed reference: key order,
              indentation and text around it are forgiven, value types are not ("34" is not 34)
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..data import collate
from ..data.records import DataError, where
from .loss import causal_lm_loss

Match = Literal["exact", "contains", "json"]
MATCHES = ("exact", "contains", "json")
REFERENCE_KEY = "reference"  # an explicit reference answer; else the final assistant turn or the completion


def normalize(text: str) -> str:
    """Ends stripped, whitespace runs collapsed to one space; nothing else (case and punctuation matter)."""
    return re.sub(r"\s+", " ", text).strip()


def first_json(text: str) -> Any:
    """The first JSON object or array that parses in `text` (None if there is none)."""
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char in "{[":
            try:
                return decoder.raw_decode(text, start)[0]
            except json.JSONDecodeError:
                continue
    return None


def is_match(output: str, reference: str, match: Match) -> bool:
    """Whether `output` answers `reference` under `match` (see the module docstring)."""
    if match == "json":
        expected = first_json(reference)
        if expected is None:
            raise DataError(f"match 'json' needs references that hold JSON; got {reference!r}")
        return first_json(output) == expected
    out, ref = normalize(output), normalize(reference)
    if match == "exact":
        return out == ref
    if match == "contains":
        return ref in out
    raise DataError(f"match must be one of {', '.join(map(repr, MATCHES))}, got {match!r}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def bf16_available(model: nn.Module) -> bool:
    """Whether the model's device computes bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16).

    Elsewhere bf16 autocast is emulated: measured on an AVX2 CPU, a bf16 matmul ran ~40x slower than fp32.
    """
    from ..models import default_compute_dtype

    device = _device(model)
    return device.type in ("cpu", "cuda") and default_compute_dtype(device) == torch.bfloat16


def _autocast(model: nn.Module, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(_device(model).type, dtype=torch.bfloat16, enabled=bf16)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Dropout off for the evaluation; the caller's train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def eval_loss(model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, Any]], *, batch_size: int = 8,
              chunk_size: int = 0, bf16: bool = False, progress: bool = False) -> dict[str, float]:
    """{"loss": mean cross-entropy per labelled token, "perplexity": exp(loss), "tokens": labelled tokens}.

    `examples` are tokenized rows (`deltatune.data.tokenize`); the loss is summed over every labelled token
    and divided once, so batches of different sizes weigh by their tokens, not equally.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    device = _device(model)
    total, count = 0.0, 0
    with _eval_mode(model), torch.no_grad(), _bar(len(examples), "eval loss", progress) as bar:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(list(examples[start:start + batch_size]), pad_id).items()}
            with _autocast(model, bf16):
                loss_sum, n = causal_lm_loss(model, batch, chunk_size)
            total, count = total + float(loss_sum), count + n
            bar.update(len(batch["input_ids"]))
    loss = total / count if count else math.nan
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": count}


def prompt_and_reference(record: dict[str, Any], location: str = "record") -> tuple[list[dict[str, Any]] | str, str | None]:
    """(prompt, reference answer or None) of one record.

    messages: the prompt is every turn before the final assistant turn, the reference that turn's content
    (a conversation ending on a user turn has no reference). prompt/completion: the prompt and the completion.
    An explicit `reference` key overrides the reference either way.
    """
    if "messages" in record:
        messages = list(record["messages"])
        reference = None
        if messages and messages[-1].get("role") == "assistant":
            reference = messages.pop()["content"]
        if not messages:
            raise DataError(f"{location}: a conversation needs at least one turn before the assistant's answer")
        prompt: list[dict[str, Any]] | str = messages
    elif "prompt" in record:
        prompt, reference = record["prompt"], record.get("completion")
    else:
        raise DataError(f"{location}: generation needs `messages` or `prompt` (keys present: {', '.join(sorted(record)) or 'none'})")
    if record.get(REFERENCE_KEY) is not None:
        reference = str(record[REFERENCE_KEY])
    return prompt, reference


def _prompt_ids(tokenizer: Any, prompt: list[dict[str, Any]] | str) -> list[int]:
    """Token ids of the prompt as training renders it: the chat template with its generation prompt, if any."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template wrote any BOS itself
    if not isinstance(prompt, str):
        raise DataError("a `messages` record needs a tokenizer with a chat template; give `prompt`/`completion` rows")
    return list(tokenizer(prompt)["input_ids"])


def prompt_ids(tokenizer: Any, prompt: list[dict[str, Any]] | str, *, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids of a prompt as training renders it: the chat template with its generation prompt (a `system`
    turn first, if given), or with `raw` (or a tokenizer without a template) the text itself."""
    if system is not None:
        if raw or not getattr(tokenizer, "chat_template", None) or not isinstance(prompt, str):
            raise DataError("a system prompt needs a chat template and a text prompt (not --raw)")
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    if raw and isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    return _prompt_ids(tokenizer, prompt)


def generate_batch(model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], *, max_new_tokens: int,
                   bf16: bool = False, temperature: float = 0.0, streamer: Any = None) -> list[str]:
    """Continuations of token-id prompts (greedy, or sampled at `temperature` > 0), decoded without special
    tokens; rows left-padded to one length. The one generation path of evaluation and `deltatune generate`
    (a transformers streamer, for a single prompt, prints the tokens as they come)."""
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=_device(model))
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=ids.device)
    with torch.inference_mode(), _autocast(model, bf16):
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            use_cache=True, temperature=temperature or None, top_p=None, top_k=None, pad_token_id=pad_id,
            streamer=streamer,
        )
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def _bar(total: int, desc: str, enabled: bool):
    """A progress bar on stderr (tqdm) over `total` items, or one that draws nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False, dynamic_ncols=True)


def _engine_requests(model: nn.Module, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int,
                     bf16: bool) -> tuple[Any, list[Any]] | None:
    """The serving engine with a greedy request queued per prompt, running the model as it stands (its one
    active adapter, or the base), or None where it cannot: not a Llama-family model or an adapter outside the
    decoder blocks (`check_servable`), an adapter the engine refuses (trained in place, a model-level part
    other than virtual tokens), several active adapters stacked, merged or disabled adapters, or a prompt
    longer than the model's context. The one place evaluation chooses between the engine and `generate_batch`.
    """
    from ..core.model import active_adapters, adapters
    from ..core.sites import hosts
    from ..serve.engine import Engine, check_servable
    from ..serve.sampling import RequestError, SamplingParams

    active = active_adapters(model)
    parts = [a.part(model) for a in adapters(model).values()]
    if len(active) > 1 or any(h.merged_adapters or h.adapters_disabled for _, h in hosts(model)) \
            or any(getattr(part, "disabled", False) for part in parts):
        return None
    try:
        check_servable(model)
    except TypeError:
        return None
    # no tokenizer: the engine then stops at the model's end-of-sequence ids, as generate() does
    engine = Engine(model, None, max_batch_size=batch_size, autocast=torch.bfloat16 if bf16 else None)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    try:
        return engine, [engine.add_request(ids, active[0] if active else None, params) for ids in prompts]
    except RequestError:  # an adapter the engine refuses, a prompt too long for the context
        return None


def _generate_all(model: nn.Module, tokenizer: Any, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
                  bf16: bool, engine: bool, bar: Any) -> tuple[list[str], str]:
    """(greedy continuation of every prompt, in order; "engine" or "generate_batch": the path that ran)."""
    queued = _engine_requests(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=bf16) \
        if engine else None
    if queued is not None:
        serving, requests = queued
        while serving.has_unfinished():
            bar.update(sum(out.finished for out in serving.step()))
        return [tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in requests], "engine"
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        outputs += generate_batch(model, tokenizer, chunk, max_new_tokens=max_new_tokens, bf16=bf16)
        bar.update(len(chunk))
    return outputs, "generate_batch"


def eval_generation(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]], *, max_new_tokens: int = 64,
                    match: Match = "exact", batch_size: int = 16, bf16: bool = False, progress: bool = False,
                    engine: bool = True) -> dict[str, Any]:
    """Greedy generation for every record that has a reference answer, scored by `match` after `normalize`.

    Returns {"score": share matched (0..1; NaN when no record has a reference), "n": records scored,
    "samples": [{"prompt", "reference", "output", "correct"}, ...] in record order, "path": "engine" or
    "generate_batch"}. Prompts go shortest first (less padding), `batch_size` rows at a time: through the
    serving engine where it runs the model (`_engine_requests`; engine=False: never), each row stopping at
    its end-of-sequence or after `max_new_tokens` and its place taken by the next prompt; else in batches
    of `generate_batch`, each stopping when every row has ended.
    """
    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(map(repr, MATCHES))}, got {match!r}")
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError(f"batch_size and max_new_tokens must be positive, got {batch_size} and {max_new_tokens}")
    items = []  # (prompt, reference, prompt ids)
    for index, record in enumerate(records):
        prompt, reference = prompt_and_reference(record, where(records, index))
        if reference is not None:
            items.append((prompt, reference, _prompt_ids(tokenizer, prompt)))
    outputs: list[str] = [""] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i][2]))
    with _eval_mode(model), _bar(len(order), "generating", progress) as bar:
        texts, path = _generate_all(model, tokenizer, [items[i][2] for i in order], max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, bf16=bf16, engine=engine, bar=bar)
    for i, text in zip(order, texts):
        outputs[i] = text.strip()
    samples = [
        {"prompt": prompt, "reference": reference, "output": output, "correct": is_match(output, reference, match)}
        for (prompt, reference, _), output in zip(items, outputs)
    ]
    correct = sum(s["correct"] for s in samples)
    return {"score": correct / len(samples) if samples else math.nan, "n": len(samples), "samples": samples,
            "path": path}
