"""`deltatune serve`: one base model and many adapters behind an OpenAI-compatible HTTP API.

    deltatune serve --adapter support=runs/support/adapter --adapter-dir adapters/ --max-adapter-memory 512MB
    deltatune serve --quantize nf4 --adapter support=runs/qlora/adapter      # a 4-bit NF4 base (QLoRA's)
"""
from __future__ import annotations

import argparse
import os
import re
import sys

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def byte_size(text: str, flag: str = "--max-adapter-memory") -> int:
    """'512MB', '2GiB', '1000000' -> bytes."""
    match = _SIZE.fullmatch(text.strip())
    unit = (match.group(2) or "").upper() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{flag} takes a size such as 512MB, 2GiB or 1000000 (bytes), got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def _named_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter takes NAME=PATH (e.g. support=runs/support/adapter), got {text!r}")
    return name, path


def _at_least(low: int, flag: str):
    """An argparse type: an integer >= low, else an error naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= {low}, got {text!r}")
        return value
    return parse


def _positive(flag: str):
    return _at_least(1, flag)


def add_arguments(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--base", default=None, help=model_help)
    p.add_argument("--served-model-name", default=None,
                   help="the `model` value that selects the base alone (default: the base's directory name)")
    p.add_argument("--adapter", action="append", type=_named_path, default=[], metavar="NAME=PATH",
                   help="an adapter served under NAME, loaded at start (repeatable)")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="a directory whose adapter subdirectories load on first request, by name (repeatable)")
    p.add_argument("--max-adapter-memory", type=byte_size, default=None, metavar="SIZE",
                   help="bytes of resident adapters at most (e.g. 512MB); least recently used ones are evicted")
    p.add_argument("--pin", action="append", default=[], metavar="NAME", help="never evict this adapter (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("DELTATUNE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $DELTATUNE_API_KEY, else open)")
    p.add_argument("--admin-token", default=os.environ.get("DELTATUNE_ADMIN_TOKEN"),
                   help="enable /admin/adapters (load/unload from --adapter-dir) guarded by this token "
                   "(default: $DELTATUNE_ADMIN_TOKEN, else the admin endpoints do not exist)")
    p.add_argument("--max-batch-size", type=_positive("--max-batch-size"), default=64)
    p.add_argument("--max-model-len", type=_positive("--max-model-len"), default=None,
                   help="prompt + generated tokens at most (default: the model's context length)")
    p.add_argument("--max-prefill-tokens", type=_positive("--max-prefill-tokens"), default=4096,
                   help="padded prompt tokens prefilled per step (bounds how long new requests stall running ones)")
    p.add_argument("--prefix-cache-memory", type=lambda text: byte_size(text, "--prefix-cache-memory"), default=256 << 20, metavar="SIZE",
                   help="bytes of prompt K/V kept for reuse by prompts that start alike (default 256MiB; 0: off)")
    p.add_argument("--prefill-chunk", type=_positive("--prefill-chunk"), default=512,
                   help="prompt tokens of one request prefilled per step at most; a longer prompt continues at the "
                   "next steps while the running requests decode (chunked prefill)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 weights where the CPU computes bf16 natively (AVX512-BF16/AMX), else fp32")
    p.add_argument("--quantize", choices=("auto", "nf4", "gguf", "none"), default="auto",
                   help="nf4: the base's linear layers in 4-bit NF4 (QLoRA), computing in --precision; auto "
                   "(default): NF4 if every --adapter was trained on an NF4 base, as their files record; none: "
                   "the base as --precision loads it")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: one per idle core)")
    p.add_argument("--max-body-bytes", type=_positive("--max-body-bytes"), default=2 << 20,
                   help="a request body larger than this gets 413, before it is read (default 2 MiB)")
    p.add_argument("--max-connections", type=_positive("--max-connections"), default=1024,
                   help="open connections at most; one more gets 503 at once (default 1024)")
    p.add_argument("--max-connections-per-client", type=_at_least(0, "--max-connections-per-client"), default=256,
                   help="open connections of one client address at most; one more gets 503 (default 256; 0: no "
                   "such cap, e.g. behind a proxy, where every client has the proxy's address)")
    p.add_argument("--request-timeout", type=_positive("--request-timeout"), default=30,
                   help="seconds for a request's headers and body to arrive, else 408 (default 30)")
    p.add_argument("--no-access-log", action="store_true", help="no line per request on stderr")


def base_quantization(args: argparse.Namespace) -> str | None:
    """--quantize: "nf4", None (none), or for auto "nf4" when every --adapter NAME=PATH records an NF4 base
    (adapters found later in --adapter-dir load onto whichever base is served: LoRA's file fits both)."""
    from ..commands import BASE_NAMES, quantize_for, recorded_base_quantization

    if args.quantize != "auto":
        return None if args.quantize == "none" else args.quantize
    kinds = {quantize_for(recorded_base_quantization(path)) for _, path in args.adapter}
    if len(kinds) != 1 or None in kinds:
        return None
    kind = kinds.pop()
    print(f"deltatune serve: every --adapter was trained on {BASE_NAMES[kind]} base: serving the base so (--quantize "
          "none for the full-precision base)", file=sys.stderr, flush=True)
    return kind


def own_base_adapter(args: argparse.Namespace) -> str | None:
    """The name of the --adapter that rebuilds its own 4-bit base (LoftQ / QPiSSA, as its file records), which
    is then the only adapter served; None if there is none. CommandError if other adapters are asked for too."""
    from ..cli import CommandError
    from ..commands import OWN_BASES, recorded_base_quantization

    own = [name for name, path in args.adapter if recorded_base_quantization(path) in OWN_BASES]
    if not own:
        return None
    if len(args.adapter) > 1 or args.adapter_dir or args.quantize not in ("auto", "none"):
        raise CommandError(f"--adapter {own[0]}: a LoftQ/QPiSSA adapter's 4-bit base is rebuilt from the full-precision "
                           "weights for it alone, so it is served on its own, without other --adapter, --adapter-dir "
                           "or --quantize nf4|gguf")
    print(f"deltatune serve: {own[0]} rebuilds its own 4-bit base from the full-precision weights (LoftQ/QPiSSA); "
          "no other adapter loads beside it, and the base model's name is not served", file=sys.stderr, flush=True)
    return own[0]


def _cast_beside(model: Any, keep: str, dtype: Any) -> None:
    """Everything but attached adapter `keep` to `dtype` (the 4-bit layers keep their codes and constants)."""
    import torch

    from ..core.model import adapters

    model.to(dtype)
    for _, delta in adapters(model)[keep].deltas(model):
        delta.to(torch.float32)  # adapters stay fp32 on a bf16 base, as AdapterRegistry keeps them


def serve_main(args: argparse.Namespace) -> None:
    import torch

    from ..cli import CommandError
    from ..models import default_compute_dtype, load_model
    from ..threads import apply_threads
    from .engine import Engine, check_servable
    from .registry import AdapterRegistry
    from .guards import Limits
    from .sampling import RequestError
    from .server import Server

    DrainingServer = _draining_server()

    line = apply_threads(args.threads)
    if line:
        print(line, flush=True)
    dtype = default_compute_dtype() if args.precision == "auto" else \
        torch.bfloat16 if args.precision == "bf16" else torch.float32
    quantize, own_base = base_quantization(args), own_base_adapter(args)
    # an adapter that rebuilds its own 4-bit base does so from the full-precision weights it was trained on
    model, tokenizer = load_model(args.base, dtype=torch.float32 if own_base else dtype, quantize=quantize,
                                  compute_dtype=dtype if quantize else None)
    try:
        check_servable(model)
    except TypeError as exc:
        raise CommandError(f"--base: {exc}") from None
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                    max_prefill_tokens=args.max_prefill_tokens, prefill_chunk=args.prefill_chunk,
                    prefix_cache_bytes=args.prefix_cache_memory)
    try:  # an adapter the engine cannot run (full fine-tuning, BitFit, ...) is refused here, by name
        registry = AdapterRegistry(model, adapter_dirs=args.adapter_dir, max_bytes=args.max_adapter_memory,
                                   check=engine.check_adapter, own_base=own_base)
    except FileNotFoundError as exc:
        raise CommandError(str(exc)) from None
    for name, path in args.adapter:
        try:
            registry.add(name, path, pin=name in args.pin)
        except (RequestError, ValueError) as exc:
            raise CommandError(f"--adapter {name}={path}: {exc}") from None
    if own_base and dtype != torch.float32:  # Q_T is built: the rest of the model to --precision, the adapter kept
        _cast_beside(model, registry.entries[own_base].internal, dtype)
    for name in args.pin:
        try:
            registry.pin(name)
        except RequestError as exc:
            raise CommandError(f"--pin {name}: {exc}") from None
    base_name = args.served_model_name or os.path.basename(os.path.normpath(args.base or "smollm2-135m-instruct"))
    limits = Limits(max_body_bytes=args.max_body_bytes, max_connections=args.max_connections,
                    request_timeout=float(args.request_timeout),
                    max_connections_per_client=args.max_connections_per_client or None)
    server = Server(engine, registry, base_name=base_name, api_key=args.api_key, admin_token=args.admin_token,
                    limits=limits)
    weights = (f"{quantize.upper()}, computing in " if quantize else "") + ("bf16" if dtype == torch.bfloat16 else "fp32")
    print(f"deltatune serve: {base_name} ({weights}) with {len(registry.entries)} adapters loaded, "
          f"{len(registry.available())} available; http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    _log_to_stderr(access=not args.no_access_log)
    DrainingServer(server.uvicorn_config(args.host, args.port), engine).run()


def _log_to_stderr(access: bool) -> None:
    """deltatune.serve's warnings, and its access lines unless turned off, on stderr."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    for name, level in (("deltatune.serve", logging.WARNING), ("deltatune.serve.access", logging.INFO if access else
                                                                 logging.WARNING)):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if name == "deltatune.serve":
            logger.addHandler(handler)


def _draining_server():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server saying what SIGTERM/SIGINT does: no new connections, running requests finish."""

        def __init__(self, config, engine) -> None:
            super().__init__(config)
            self.engine = engine

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                print(f"deltatune serve: signal {sig}: accepting no new requests, finishing {len(self.engine.running)} "
                      f"running and {len(self.engine.waiting)} waiting (again to stop now)", file=sys.stderr, flush=True)
            super().handle_exit(sig, frame)

    return DrainingServer
