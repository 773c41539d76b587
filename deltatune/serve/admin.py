"""The server's admin routes (adapter load/unload: deltatune's and vLLM's spellings, behind the admin token) and
vLLM's /tokenize and /detokenize. A mixin of server.Server, which provides the registry, engine and checks."""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .sampling import RequestError


class AdminRoutes:
    # ---- admin ---------------------------------------------------------------------------------------
    async def admin_list(self, request: Request) -> JSONResponse:
        self._check_admin(request)
        return JSONResponse({"data": [
            {"name": e.name, "bytes": e.nbytes, "pinned": e.pinned, "requests": e.refs, "path": str(e.path or "")}
            for e in self.registry.entries.values()], "resident_bytes": self.registry.resident_bytes(),
            "max_bytes": self.registry.max_bytes})

    async def admin_load(self, request: Request) -> JSONResponse:
        self._check_admin(request)
        body = await self._json_body(request)
        name, path, pin = body.get("name"), body.get("path"), body.get("pin", False)
        if not isinstance(name, str) or not isinstance(path, str) or not isinstance(pin, bool):
            raise RequestError("send {\"name\": str, \"path\": str (inside --adapter-dir), \"pin\": bool}", param="name")
        entry = await self._load(name, path, pin)
        return JSONResponse({"name": entry.name, "bytes": entry.nbytes, "pinned": entry.pinned})

    async def _load(self, name: str, path: str, pin: bool = False):
        """Load (or atomically replace: requests in flight finish on the old one) adapter `name` from `path`."""
        if name == self.base_name:
            raise RequestError(f"{name!r} is the base model's name; choose another adapter name", param="name",
                               code="name_taken", status=409)
        try:
            resolved = self.registry.allowed_path(path)
        except PermissionError as exc:
            raise RequestError(str(exc), param="path", status=403) from None
        except FileNotFoundError as exc:
            raise RequestError(str(exc), param="path", status=404) from None
        try:
            return await run_in_threadpool(self.registry.add, name, resolved, pin=pin)
        except ValueError as exc:
            if isinstance(exc, RequestError):
                raise
            raise RequestError(str(exc), param="name") from None

    async def _unload(self, name: str) -> None:
        try:
            await run_in_threadpool(self.registry.unload, name)
        except KeyError as exc:
            raise RequestError(str(exc.args[0]), param="name", status=404) from None
        except RuntimeError as exc:
            raise RequestError(str(exc), param="name", status=409) from None

    async def admin_unload(self, request: Request) -> JSONResponse:
        self._check_admin(request)
        name = request.path_params["name"]
        await self._unload(name)
        return JSONResponse({"name": name, "unloaded": True})

    async def vllm_load(self, request: Request) -> Response:
        """vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path"} (admin token required)."""
        self._check_admin(request)
        body = await self._json_body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise RequestError("send {\"lora_name\": str, \"lora_path\": str (inside --adapter-dir)}", param="lora_name")
        await self._load(name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def vllm_unload(self, request: Request) -> Response:
        """vLLM's POST /v1/unload_lora_adapter {"lora_name"} (admin token required)."""
        self._check_admin(request)
        body = await self._json_body(request)
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise RequestError("send {\"lora_name\": str}", param="lora_name")
        await self._unload(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    # ---- tokenizer (vLLM's /tokenize and /detokenize) -----------------------------------------------------
    async def tokenize(self, request: Request) -> JSONResponse:
        self._check_key(request)
        body = await self._json_body(request)
        if "messages" in body:
            ids = await run_in_threadpool(self._chat_ids, body["messages"])
        elif isinstance(body.get("prompt"), str):
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise RequestError("add_special_tokens must be true or false", param="add_special_tokens")
            ids = await run_in_threadpool(self.engine.encode, body["prompt"], add_special_tokens=special)
        else:
            raise RequestError("send {\"prompt\": str} or {\"messages\": [...]}", param="prompt")
        return JSONResponse({"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> JSONResponse:
        self._check_key(request)
        body = await self._json_body(request)
        tokens, vocab = body.get("tokens"), self.engine.model.config.vocab_size
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab for t in tokens):
            raise RequestError(f"tokens must be a list of token ids in [0, {vocab})", param="tokens")
        if self.tokenizer is None:
            raise RequestError("this server has no tokenizer", param="tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(tokens)})


