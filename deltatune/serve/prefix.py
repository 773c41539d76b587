"""Prefix caching: the K/V of prompt blocks already computed, reused by later requests whose prompt starts alike.

A prompt is cut into blocks of `block` tokens. Block i of a request is stored under the exact key

    (what computed it, the id of block i-1's entry, the tokens of block i)

where "what computed it" is everything that changes K/V besides the tokens: the model, the attached adapter
(its attached name and its version: an adapter replaced, or re-attached under the same name, is a new
version, so a reloaded adapter never reads its predecessor's K/V; a blend is an adapter of its own, so its
weights are part of its name), and the precision (the model's dtype and the engine's autocast). Keys are
exact tuples, never hashes, so two prefixes cannot collide. vLLM once served one adapter's cached K/V to
another because its key lacked the adapter: here the adapter is the first element of every key.

Memory is bounded by `max_bytes`: least recently used blocks go first, and a lookup touches a chain from its
last block to its first, so a chain is evicted from its end and never leaves an unreachable tail.
Requests with virtual tokens (prompt tuning) are not cached. `PrefixReuse` is the engine's side: the key of a
request, its cached blocks copied into its slot, its prompt's blocks stored (`Engine` inherits it).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable

import torch

from ..core.model import adapters as attached_adapters

if TYPE_CHECKING:
    from .request import Request


@dataclass
class Block:
    id: int
    k: list[torch.Tensor]  # per layer: (kv_heads, block, head_dim)
    v: list[torch.Tensor]
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = 8) -> None:
        if max_bytes < 0 or block < 1:
            raise ValueError(f"PrefixCache needs max_bytes >= 0 and block >= 1, got {max_bytes}, {block}")
        self.max_bytes, self.block = max_bytes, block
        self.blocks: OrderedDict[tuple, Block] = OrderedDict()
        self.bytes = 0
        self._next_id = 1
        self.hits = self.queries = 0  # tokens reused, prompt tokens looked up (for metrics and benchmarks)

    def _keys(self, owner: Hashable, tokens: list[int], stop: int):
        """(key, parent id) of each stored full block of tokens[:stop], in order, while found."""
        parent = 0
        for start in range(0, stop - self.block + 1, self.block):
            key = (owner, parent, tuple(tokens[start: start + self.block]))
            found = self.blocks.get(key)
            if found is None:
                return
            yield key, found
            parent = found.id

    def lookup(self, owner: Hashable, tokens: list[int]) -> list[Block]:
        """The cached blocks of the longest cached prefix, leaving at least one token to compute."""
        chain = list(self._keys(owner, tokens, len(tokens) - 1))
        for key, _ in reversed(chain):
            self.blocks.move_to_end(key)
        self.queries += len(tokens)
        self.hits += len(chain) * self.block
        return [b for _, b in chain]

    def store(self, owner: Hashable, tokens: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Store the full blocks of `tokens` whose K/V are k[layer], v[layer]: (kv_heads, >= len, head_dim)."""
        if self.max_bytes == 0:
            return
        parent = 0
        for start in range(0, len(tokens) - self.block + 1, self.block):
            key = (owner, parent, tuple(tokens[start: start + self.block]))
            found = self.blocks.get(key)
            if found is None:
                ks = [t[:, start: start + self.block].clone() for t in k]
                vs = [t[:, start: start + self.block].clone() for t in v]
                nbytes = sum(t.numel() * t.element_size() for t in (*ks, *vs))
                if nbytes > self.max_bytes:
                    return
                found = Block(self._next_id, ks, vs, nbytes)
                self._next_id += 1
                self.blocks[key] = found
                self.bytes += nbytes
                self._evict(keep=key)
            parent = found.id

    def _evict(self, keep: tuple) -> None:
        while self.bytes > self.max_bytes and self.blocks:
            key = next(iter(self.blocks))
            if key == keep:
                self.blocks.move_to_end(key)
                continue
            self.bytes -= self.blocks.pop(key).nbytes

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0


class AdapterVersions:
    """A version number per attached adapter object: a name re-attached (or replaced) gets a new one."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Any, int]] = {}
        self._count = 0

    def version(self, name: str | None, adapter: Any) -> int:
        if name is None:
            return 0
        seen = self._seen.get(name)
        if seen is None or seen[0] is not adapter:
            self._count += 1
            seen = self._seen[name] = (adapter, self._count)
        return seen[1]


class PrefixReuse:
    """The serving engine's use of its prefix cache (`Engine` inherits it): the key of what computed a request's
    K/V, the cached blocks copied into a new request's slot, a finished prompt's blocks stored."""

    prefix_cache: PrefixCache | None  # and the engine's model, cache (SlotKVCache), _versions, autocast

    def _prefix_owner(self, request: Request):
        """Everything besides the tokens that changes a prompt's K/V (the module docstring): None if not cached."""
        if self.prefix_cache is None or request.virtual:
            return None
        adapter = None if request.adapter is None else attached_adapters(self.model).get(request.adapter)
        version = self._versions.version(request.adapter, adapter)
        return (id(self.model), request.adapter, version, next(self.model.parameters()).dtype, self.autocast)

    def _reuse_prefix(self, request: Request) -> int:
        """Copy the longest cached prefix of `request`'s prompt into its slot; the number of tokens reused."""
        owner = self._prefix_owner(request)
        blocks = [] if owner is None else self.prefix_cache.lookup(owner, request.prompt_ids)
        if blocks:
            self.cache.write(request.slot, [torch.cat([b.k[i] for b in blocks], dim=1) for i in range(len(blocks[0].k))],
                             [torch.cat([b.v[i] for b in blocks], dim=1) for i in range(len(blocks[0].v))])
        return len(blocks) * (self.prefix_cache.block if blocks else 0)

    def _store_prefix(self, request: Request) -> None:
        owner = self._prefix_owner(request)
        if owner is not None and len(request.prompt_ids) >= self.prefix_cache.block:
            k, v = self.cache.row(request.slot, len(request.prompt_ids))
            self.prefix_cache.store(owner, request.prompt_ids, k, v)

    def _uncached_first_block(self, request: Request):
        """The prefix cache's key of `request`'s first prompt block, if the cache would store it and lacks it."""
        owner = self._prefix_owner(request)
        if owner is None or len(request.prompt_ids) <= self.prefix_cache.block:
            return None
        key = (owner, 0, tuple(request.prompt_ids[: self.prefix_cache.block]))
        return None if key in self.prefix_cache.blocks else key
