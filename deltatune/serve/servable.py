"""What the serving engine serves: a request's adapter spec resolved to an attached adapter (a {name: weight}
blend built once), checked servable once per adapter object, and the virtual tokens or key/values an adapter's
part puts before a row. `Engine` inherits these (deltatune.serve.engine); they read `self.model`, the blend
hook and the caches the engine sets up (`_blend`, `_blends`, `_checked`).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..core.model import adapters as attached_adapters
from .families import _BYPASSED
from .sampling import RequestError

AdapterSpec = str | Mapping[str, float] | None


class ServableAdapters:
    """The adapter side of the engine (see the module docstring)."""

    model: nn.Module
    _blend: object
    _blends: dict
    _checked: dict

    def resolve_adapter(self, adapter: AdapterSpec, label: str | None = None) -> str | None:
        """The attached adapter a request runs with; a {name: weight} blend is built once and cached."""
        if isinstance(adapter, Mapping):
            key = tuple(sorted((str(k), float(v)) for k, v in adapter.items()))
            if self._blend is not None:
                adapter = self._blend(dict(key))
            else:
                if key not in self._blends or self._blends[key] not in attached_adapters(self.model):
                    from .blends import blend_lora, blend_name
                    self._blends[key] = blend_lora(self.model, dict(key), blend_name(dict(key)))
                adapter = self._blends[key]
        if adapter is not None:
            self.check_adapter(adapter, label)
        return adapter

    def check_adapter(self, name: str, label: str | None = None) -> None:
        """Raise RequestError unless attached adapter `name` can be served (errors call it `label` if given)."""
        found = attached_adapters(self.model).get(name)
        if found is None:
            known = "" if label else f"; loaded: {sorted(attached_adapters(self.model))}"
            raise RequestError(f"no adapter named {label or name!r} is loaded{known}",
                               param="model", code="model_not_found", status=404)
        if self._checked.get(name) is found:
            return
        shown = label or name
        part = found.part(self.model)  # one of frozen buffers only (VeRA's projections) is read by its deltas
        if part is not None and not _is_prompt(part) and not _adds_positions(part) and any(True for _ in part.parameters()):
            raise RequestError(f"adapter {shown!r} ({found.config.peft_type}) adds a model-level part the serving engine "
                               "does not run (it runs virtual-token parts: prompt tuning, P-tuning, prefix tuning)",
                               param="model")
        if found.in_place():
            raise RequestError(f"adapter {shown!r} ({found.config.peft_type}) changes base parameters in place, which "
                               "cannot differ per row of a shared batch; merge it into its own model to serve it",
                               param="model")
        bypassed = [p for p in found.sites + found.saved if _BYPASSED.fullmatch(p)]
        if bypassed:
            raise RequestError(f"adapter {shown!r} wraps {bypassed[0] or 'the whole model'}, which the serving engine "
                               "does not call as a module", param="model")
        self._checked[name] = found

    def virtual_length(self, name: str | None) -> int:
        """p, the positions an adapter's virtual-token part puts before a row (0 for other adapters)."""
        part = None if name is None else attached_adapters(self.model)[name].part(self.model)
        return getattr(part, "p", 0) if part is not None and (_is_prompt(part) or _adds_positions(part)) else 0

    def virtual_key_values(self, name: str | None) -> torch.Tensor | None:
        """(layers, 2, kv_heads, p, head_dim): the keys and values a prefix-tuning adapter puts at the start of
        every layer's cache for a row (the engine writes them over the row's first p positions), else None."""
        part = None if name is None else attached_adapters(self.model)[name].part(self.model)
        return part.row_key_values().detach() if part is not None and _adds_positions(part) else None

    def virtual_tokens(self, name: str | None) -> torch.Tensor | None:
        """The (p, e) virtual-token embeddings a prompt-tuning adapter puts before a row's prompt, else None.

        The engine prepends them itself (as the adapter's hook on the decoder would) and numbers the row's
        positions from its first virtual token, as deltatune's mixed batches and peft do."""
        part = None if name is None else attached_adapters(self.model)[name].part(self.model)
        return part.row_embeddings().detach() if part is not None and _is_prompt(part) else None


def _is_prompt(part: nn.Module) -> bool:
    """A part that puts embeddings before a row (the virtual-token base's kind "embeddings"): the engine asks it
    what it adds (`row_embeddings()`, (p, e)) instead of reading one method's tensor."""
    return getattr(part, "kind", None) == "embeddings" and callable(getattr(part, "row_embeddings", None))


def _adds_positions(part: nn.Module) -> bool:
    """A virtual-token part of another kind (prefix tuning's keys and values in every layer's cache)."""
    return getattr(part, "kind", None) is not None and callable(getattr(part, "row_key_values", None))
