"""Adapters resident in a serving model: loaded on demand, bounded in bytes, evicted least recently used.

    registry = AdapterRegistry(model, adapter_dirs=["adapters/"], max_bytes=512 << 20)
    registry.add("support", "adapters/support-v2", pin=True)     # a named adapter, loaded now
    name = registry.acquire("billing")        # adapters/billing loads on first use; held until release
    name = registry.acquire({"support": 0.7, "billing": 0.3})   # a blend, built once and cached
    registry.release(name)

Public names (what clients send as `model`) map to attached names (`srv_3`), since directory names need not
be Python identifiers. Safety: a name is one path component of letters, digits, `._-`; it must resolve (symlinks
followed) to a directory inside an allowed directory; only `adapter_model.safetensors` is read, never a
pickle. Memory: the bytes of every resident adapter's tensors count against `max_bytes`; loading evicts the
least recently used adapters that are neither pinned nor held by a request, and fails (HTTP 503) rather than
evict one in use. Files are read before the model lock is taken, so a load stalls the running batch only for
the attach and copy, not for the disk.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..core.io import WEIGHTS_NAME, AdapterFileError, adapter_tensors, load_adapter, read_adapter, split_adapter_spec
from ..core.model import adapters as attached_adapters
from ..core.model import delete_adapter
from ..compose.combine import combine_adapters
from .blends import blend_lora, blend_name, check_weights  # noqa: F401 (blend_lora, blend_name: importable here too)
from .sampling import RequestError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class Entry:
    name: str  # public name
    internal: str  # attached adapter name
    path: Path | None  # None for a blend
    nbytes: int = 0
    parts: tuple[str, ...] = ()  # a blend's parts (attached names)
    pinned: bool = False
    refs: int = 0
    last_used: float = 0.0


class _NoMetrics:
    def __getattr__(self, _: str):
        return lambda *args, **kwargs: None


class AdapterRegistry:
    def __init__(self, model: nn.Module, *, adapter_dirs: list[str | os.PathLike] = (), max_bytes: int | None = None,
                 dtype: torch.dtype | None = None, lock: threading.RLock | None = None, metrics: Any = None,
                 check: Callable[[str, str], None] | None = None, own_base: str | None = None) -> None:
        self.model = model
        # own_base: the one adapter allowed to build the base for itself (LoftQ / QPiSSA: its file rebuilds Q_T
        # from the full-precision weights it loads onto); once it has, `base_owner` names it and no other
        # adapter loads (each would run on Q_T instead of the base it was trained on)
        self.own_base, self.base_owner = own_base, None
        # check(attached name, public name) raises RequestError for an adapter the engine cannot serve
        # (Engine.check_adapter): it is refused when it loads, not at every request
        self.check = check
        self.adapter_dirs = [Path(d).resolve() for d in adapter_dirs]
        for d in self.adapter_dirs:
            if not d.is_dir():
                raise FileNotFoundError(f"--adapter-dir {d} is not a directory")
        self.max_bytes = max_bytes
        # Adapters stay in fp32 (as loaded, and as peft keeps them) unless a dtype is given: on a bf16 base the
        # LoRA branch casts its input up and its output down. Measured on a Xeon with AMX (torch 2.13): a bf16
        # (rows, 8) @ (8, 576) product took 2-18 ms for some row counts against 20-40 us in fp32.
        self.dtype = dtype
        self.lock = lock or threading.RLock()  # held by the engine during each forward
        self.metrics = metrics or _NoMetrics()
        self.entries: dict[str, Entry] = {}  # resident adapters by public name
        self.retired: dict[str, Entry] = {}  # replaced adapters still held by requests, by attached name
        self.known: dict[str, Path] = {}  # named adapters (reloaded on demand after an eviction)
        self.overrides: dict[str, dict[str, Any]] = {}  # config overrides of a named adapter (`PATH@rank=4`)
        self._load_lock = threading.Lock()  # one load at a time; never held during a forward
        self._count = 0

    # ---- names and paths --------------------------------------------------------------------------------
    def find(self, name: str) -> Path | None:
        """The directory adapter `name` loads from: a named adapter, or a subdirectory of an allowed dir."""
        if name in self.known:
            return self.known[name]
        if not _NAME.fullmatch(name) or name in (".", ".."):
            return None
        for root in self.adapter_dirs:
            path = (root / name).resolve()
            if path.parent == root and (path / WEIGHTS_NAME).is_file():
                return path
        return None

    def allowed_path(self, path: str | os.PathLike) -> Path:
        """`path` (relative to an allowed dir, or absolute) resolved inside an allowed dir, else PermissionError."""
        raw = Path(path)
        candidates = [raw] if raw.is_absolute() else [root / raw for root in self.adapter_dirs]
        for candidate in candidates:
            resolved = candidate.resolve()
            if any(resolved != root and resolved.is_relative_to(root) for root in self.adapter_dirs):
                if not (resolved / WEIGHTS_NAME).is_file():
                    raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} (only safetensors adapters are served)")
                return resolved
        raise PermissionError(f"{path} is not inside an allowed adapter directory "
                              f"({', '.join(map(str, self.adapter_dirs)) or 'none configured: --adapter-dir'})")

    def available(self) -> list[str]:
        """Public names a request may use: resident, named, and every adapter subdirectory of the allowed dirs."""
        names = {n for n, e in self.entries.items() if e.path is not None} | set(self.known)  # not blends
        for root in self.adapter_dirs:  # what find() accepts: a symlink out of the directory is not listed
            names.update(p.name for p in root.iterdir() if self.find(p.name) is not None)
        return sorted(names)

    def public_name(self, internal: str) -> str:
        """The name a client used for attached adapter `internal` (for messages); `internal` if unknown."""
        for entry in (*self.entries.values(), *self.retired.values()):
            if entry.internal == internal:
                return entry.name
        return internal

    # ---- loading, holding, evicting -----------------------------------------------------------------------
    def add(self, name: str, path: str | os.PathLike, *, pin: bool = False) -> Entry:
        """Make `name` a named adapter read from `path` (any directory the operator gives) and load it now.

        A name already loaded is replaced atomically: the new adapter loads under a new attached name (its
        version), new requests get it, and requests holding the old one finish on it (it is removed when the
        last releases it); blends built from the old one are dropped. If the new one fails to load, the old
        one stays."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"adapter name {name!r} must be letters, digits and ._- (starting with a letter or digit)")
        path, overrides = split_adapter_spec(path)  # `PATH@rank=4`: config overrides (a DyLoRA's rank)
        path = Path(path).resolve()
        with self._load_lock:
            entry = self._load(name, path, overrides)
            self.known[name] = path
            self.overrides[name] = overrides
        entry.pinned = entry.pinned or pin
        return entry

    def acquire(self, spec: str | Mapping[str, float]) -> str:
        """Hold the adapter (or blend) a request uses, loading it if needed; returns its attached name."""
        if isinstance(spec, Mapping):
            return self._hold(self._blend_entry(spec))
        return self._hold(self._ensure(spec))

    def release(self, internal: str) -> None:
        with self.lock:
            old = self.retired.get(internal)
            if old is not None:
                old.refs -= 1
                if old.refs <= 0:
                    del self.retired[internal]
                    delete_adapter(self.model, internal)
                return
            for entry in self.entries.values():
                if entry.internal == internal and entry.refs > 0:
                    entry.refs -= 1
                    return

    def blend(self, weights: Mapping[str, float]) -> str:
        """Attached name of the cached blend of `weights` (for Engine(blend=...)); not held."""
        return self._blend_entry(weights).internal

    def add_combination(self, name: str, weights: Mapping[str, float], *, pin: bool = False,
                        directory: str | os.PathLike | None = None, **options: Any) -> Entry:
        """Make `name` a named combination of adapters (`deltatune.compose.combine_adapters` with `options`, e.g.
        combination_type="svd", svd_rank=8; default cat). It is built once and saved under `directory` (default:
        a temporary directory of this registry), then is a named adapter like any other: listed, counted against
        max_bytes, evicted and reloaded from its file. Per-request blends stay ephemeral and unlisted."""
        from ..compose.combine import CombineError
        from ..core.io import save_adapter

        if not _NAME.fullmatch(name):
            raise ValueError(f"adapter name {name!r} must be letters, digits and ._- (starting with a letter or digit)")
        weights = check_weights(weights)
        options.setdefault("combination_type", "cat")
        parts: dict[str, str] = {}
        try:
            for n in weights:  # held while the combination is built
                parts[n] = self.acquire(n)
            with self.lock:
                temp = self._new_internal()
                combine_adapters(self.model, [parts[n] for n in weights], list(weights.values()), temp, **options)
                try:
                    if directory is None:
                        import tempfile
                        self._combinations = getattr(self, "_combinations", None) or tempfile.mkdtemp(prefix="deltatune-combined-")
                    path = save_adapter(self.model, Path(directory or self._combinations) / name, temp)
                finally:
                    delete_adapter(self.model, temp)
        except CombineError as exc:
            raise RequestError(f"cannot combine {', '.join(map(repr, weights))} into {name!r}: {exc}", param="adapters") from None
        finally:
            for internal_part in parts.values():
                self.release(internal_part)
        return self.add(name, path, pin=pin)

    def pin(self, name: str, pinned: bool = True) -> None:
        self._ensure(name).pinned = pinned

    def unload(self, name: str) -> None:
        """Remove a resident adapter now (admin); refused while a request uses it."""
        with self.lock:
            entry = self.entries.get(name)
            if entry is None:
                raise KeyError(f"adapter {name!r} is not loaded; loaded: {sorted(self.entries)}")
            if entry.refs:
                raise RuntimeError(f"adapter {name!r} is in use by {entry.refs} request(s); unload it when they finish")
            self._retire(entry)  # and the blends built from it
            self.known.pop(name, None)

    def resident_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def _hold(self, entry: Entry) -> str:
        with self.lock:
            entry.refs += 1
            entry.last_used = time.monotonic()
            return entry.internal

    def _ensure(self, name: str) -> Entry:
        with self.lock:
            entry = self.entries.get(name)
            if entry is not None:
                self.metrics.adapter_hit(name)
                entry.last_used = time.monotonic()
                return entry
        path = self.find(name) if isinstance(name, str) else None
        if path is None:
            raise RequestError(f"the model {name!r} does not exist: not the base, not a named adapter, not an adapter "
                               "directory inside --adapter-dir", param="model", code="model_not_found", status=404)
        with self._load_lock:
            with self.lock:
                if name in self.entries:
                    return self.entries[name]
            return self._load(name, path)

    def _load(self, name: str, path: Path, overrides: Mapping[str, Any] | None = None) -> Entry:
        started = time.perf_counter()
        overrides = self.overrides.get(name, {}) if overrides is None else overrides
        try:
            config, tensors, _ = read_adapter(path)  # disk and validation, outside the model lock
        except AdapterFileError as exc:
            raise RequestError(f"adapter {name!r} cannot be loaded: {exc}", param="model", status=400) from None
        builds_base = self._check_base(name, config)
        needed = sum(t.numel() * (t.element_size() if self.dtype is None else self.dtype.itemsize) for t in tensors.values())
        with self.lock:
            self._make_room(needed)
            internal = self._new_internal()
            try:
                load_adapter(self.model, path, internal, activate=False, overrides=overrides)  # from the page cache
            except AdapterFileError as exc:
                raise RequestError(f"adapter {name!r} does not fit this base model: {exc}", param="model") from None
            if self.check is not None:
                try:
                    self.check(internal, name)
                except RequestError:
                    delete_adapter(self.model, internal)
                    raise
            old = self.entries.get(name)
            if old is not None:
                self._retire(old)
            entry = self._register(name, internal, path)
            if builds_base:
                self.base_owner, entry.pinned = name, True  # never evicted: its base cannot be rebuilt
        self.metrics.adapter_loaded(name, entry.nbytes, time.perf_counter() - started)
        return entry

    def _check_base(self, name: str, config: Any) -> bool:
        """Whether adapter `name` builds the base for itself (LoftQ / QPiSSA); RequestError 409 where it would
        change the base under other adapters, or where the base already is another adapter's."""
        from ..methods.lora_init import quantizes_base

        if self.base_owner is not None:
            raise RequestError(f"the base in memory is adapter {self.base_owner!r}'s own 4-bit base (LoftQ/QPiSSA, "
                               f"rebuilt for it alone), so adapter {name!r} cannot load beside it or replace it; "
                               "restart the server to serve other adapters", param="model", code="base_owned",
                               status=409)
        if not quantizes_base(config):
            return False
        if name != self.own_base or self.entries:
            raise RequestError(f"adapter {name!r} is a LoftQ/QPiSSA adapter: its 4-bit base is rebuilt from the "
                               "full-precision weights for it alone, which would change the base under every other "
                               f"adapter; serve it on its own: deltatune serve --adapter {name}=PATH",
                               param="model", code="needs_own_base", status=409)
        return True

    def _register(self, name: str, internal: str, path: Path | None) -> Entry:
        if self.dtype is not None:
            for _, delta in attached_adapters(self.model)[internal].deltas(self.model):
                delta.to(self.dtype)
        nbytes = sum(t.numel() * t.element_size() for t in adapter_tensors(self.model, internal).values())
        entry = Entry(name, internal, path, nbytes, last_used=time.monotonic())
        self.entries[name] = entry
        return entry

    def _new_internal(self) -> str:
        self._count += 1
        return f"srv_{self._count}"

    def _make_room(self, needed: int) -> None:
        """Evict least recently used idle, unpinned adapters until `needed` more bytes fit the budget."""
        if self.max_bytes is None:
            return
        if needed > self.max_bytes:
            raise RequestError(f"the adapter needs {needed} bytes, more than the whole budget of {self.max_bytes} "
                               "(--max-adapter-memory)", param="model", status=507)
        for entry in sorted(self.entries.values(), key=lambda e: e.last_used):
            if self.resident_bytes() + needed <= self.max_bytes:
                return
            if not entry.pinned and entry.refs == 0:
                self._drop(entry, evicted=True)
        if self.resident_bytes() + needed > self.max_bytes:
            raise RequestError(
                f"adapter memory is full ({self.resident_bytes()} of {self.max_bytes} bytes held by pinned adapters "
                "or running requests); retry later or raise --max-adapter-memory", code="adapter_memory_full", status=503)

    def _retire(self, old: Entry) -> None:
        """Take `old` (and the blends built from it) out of service: removed now if idle, else when released."""
        stale = [e for e in self.entries.values() if old.internal in e.parts]
        for entry in [old, *stale]:
            if entry.refs:
                del self.entries[entry.name]
                self.retired[entry.internal] = entry
            else:
                self._drop(entry, evicted=False)

    def _drop(self, entry: Entry, *, evicted: bool) -> None:
        delete_adapter(self.model, entry.internal)
        del self.entries[entry.name]
        self.metrics.adapter_removed(entry.name, evicted)

    # ---- blends -----------------------------------------------------------------------------------------
    def _blend_entry(self, weights: Mapping[str, float]) -> Entry:
        weights = check_weights(weights)
        name = blend_name(weights)
        with self.lock:
            if name in self.entries:
                self.metrics.adapter_hit(name)
                return self.entries[name]
        parts: dict[str, str] = {}
        try:
            for n in weights:  # held while the blend is built; released however it ends
                parts[n] = self.acquire(n)
            with self.lock:
                sizes = [self.entries[n].nbytes for n in weights]
                self._make_room(sum(sizes))
                labels = {parts[n]: n for n in weights}
                internal = blend_lora(self.model, {parts[n]: w for n, w in weights.items()}, self._new_internal(),
                                      labels=labels)
                entry = self._register(name, internal, None)
                entry.parts = tuple(parts.values())
        finally:
            for internal_part in parts.values():
                self.release(internal_part)
        self.metrics.adapter_loaded(name, entry.nbytes, 0.0)
        return entry
