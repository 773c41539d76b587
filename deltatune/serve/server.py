"""The OpenAI-compatible HTTP server (Starlette on uvicorn) over the engine worker and the adapter registry.

    GET  /v1/models                 the base and every adapter a request may name
    POST /v1/completions            prompt -> text; `model` names an adapter or the base; stream=true for SSE
    POST /v1/chat/completions       messages -> reply, through the tokenizer's chat template
    GET  /health, GET /metrics      liveness; Prometheus text format
    POST /admin/adapters, DELETE /admin/adapters/{name}, GET /admin/adapters
                                    only with an admin token, which every admin call must carry

`model` may also be a blend, "a:0.7+b:0.3", or the request may carry `"adapters": {"a": 0.7, "b": 0.3}`
(extra_body in the openai client). Errors are OpenAI's body, {"error": {"message", "type", "param", "code"}},
with 400 for a malformed request, 401 for a missing or wrong key, 404 for an unknown model.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine
from .request import StepOutput
from .metrics import CONTENT_TYPE_LATEST, ServeMetrics
from .registry import AdapterRegistry, blend_name
from .sampling import RequestError, SamplingParams
from .worker import EngineWorker

log = logging.getLogger("deltatune.serve")


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Server:
    def __init__(self, engine: Engine, registry: AdapterRegistry, *, base_name: str = "base",
                 api_key: str | None = None, admin_token: str | None = None, metrics: ServeMetrics | None = None) -> None:
        self.engine, self.registry, self.tokenizer = engine, registry, engine.tokenizer
        self.base_name, self.api_key, self.admin_token = base_name, api_key, admin_token
        self.metrics = metrics or ServeMetrics()
        registry.metrics = self.metrics
        self.metrics.watch(lambda: len(engine.waiting), lambda: len(engine.running),
                           lambda: len(registry.entries), registry.resident_bytes)
        self.worker = EngineWorker(engine, registry, self.metrics)
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health), Route("/metrics", self.metrics_text),
            Route("/v1/models", self.models), Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]
        if self.admin_token:
            routes += [Route("/admin/adapters", self.admin_list), Route("/admin/adapters", self.admin_load, methods=["POST"]),
                       Route("/admin/adapters/{name}", self.admin_unload, methods=["DELETE"])]
        handlers = {HTTPException: self._http_error, RequestError: self._request_error, Exception: self._internal_error}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.worker.start()
        try:
            yield
        finally:
            self.worker.stop()

    # ---- errors and auth -----------------------------------------------------------------------------
    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    async def _request_error(self, request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, str(exc), param=exc.param, code=exc.code)

    async def _internal_error(self, request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(500, f"internal server error ({type(exc).__name__})")

    @staticmethod
    def _bearer_ok(request: Request, secret: str | None) -> bool:
        if secret is None:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), secret.encode())

    def _check_key(self, request: Request) -> None:
        if not self._bearer_ok(request, self.api_key):
            raise RequestError("missing or incorrect API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", status=401)

    def _check_admin(self, request: Request) -> None:
        if not self._bearer_ok(request, self.admin_token):
            raise RequestError("admin endpoints need 'Authorization: Bearer <admin token>' (--admin-token)",
                               code="invalid_admin_token", status=401)

    # ---- plain endpoints -----------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "running": len(self.engine.running), "waiting": len(self.engine.waiting)})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> JSONResponse:
        self._check_key(request)
        names = [self.base_name] + [n for n in self.registry.available() if n != self.base_name]
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": self.created, "owned_by": "deltatune",
             "root": self.base_name, "parent": None if n == self.base_name else self.base_name} for n in names]})

    # ---- generation ----------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        self._check_key(request)
        body = await _json_body(request)
        ids = self._prompt_ids(body.get("prompt"))
        return await self._generate(request, body, ids, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        self._check_key(request)
        body = await _json_body(request)
        ids = self._chat_ids(body.get("messages"))
        return await self._generate(request, body, ids, chat=True)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.engine.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise RequestError("prompt must be a string or a list of token ids (one prompt per request)", param="prompt")

    def _chat_ids(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
        plain = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise RequestError("each message needs a string role and a string (or text parts) content",
                                   param="messages")
            plain.append({"role": m["role"], "content": content})
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions", param="messages")
        text = self.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        return self.engine.encode(text, add_special_tokens=False)

    def _model_spec(self, body: dict) -> tuple[str | dict | None, str]:
        """(what the registry acquires: None for the base, a name or a blend; the metrics label)."""
        model, blend = body.get("model"), body.get("adapters")
        if not isinstance(model, str) or not model:
            raise RequestError("model is required: the base model's name or an adapter's (GET /v1/models)", param="model")
        if blend is None and (":" in model or "+" in model) and model not in self.registry.entries:
            blend = {}
            for part in model.split("+"):
                name, _, weight = part.partition(":")
                try:
                    blend[name.strip()] = float(weight) if weight else 1.0
                except ValueError:
                    raise RequestError(f"cannot read blend {model!r}: write name:weight+name:weight", param="model") from None
        if blend is not None:
            if not isinstance(blend, dict):
                raise RequestError("adapters must be an object {name: weight}", param="adapters")
            return blend, blend_name(blend)
        return (None, "base") if model == self.base_name else (model, model)

    def _params(self, body: dict, prompt_len: int, chat: bool) -> SamplingParams:
        if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
            raise RequestError("only n=1 is served; send several requests instead", param="n")
        max_tokens = body.get("max_completion_tokens") if chat else None
        max_tokens = max_tokens if max_tokens is not None else body.get("max_tokens", None if chat else 16)
        if max_tokens is None:
            max_tokens = max(1, self.engine.max_model_len - prompt_len)
        stop = body.get("stop")
        stop = [] if stop is None else stop
        if not isinstance(stop, (str, list)):
            raise RequestError("stop must be a string or a list of strings", param="stop")
        temperature = body.get("temperature")
        top_p = body.get("top_p")
        return SamplingParams(max_new_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                              top_p=1.0 if top_p is None else top_p, seed=body.get("seed"),
                              stop=(stop,) if isinstance(stop, str) else tuple(stop))

    async def _generate(self, request: Request, body: dict, ids: list[int], *, chat: bool) -> Response:
        spec, label = self._model_spec(body)
        params = self._params(body, len(ids), chat)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("stream_options must be an object, e.g. {\"include_usage\": true}", param="stream_options")
        include_usage = bool(options.get("include_usage")) if stream else False
        adapter = await run_in_threadpool(self.registry.acquire, spec) if spec is not None else None
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            self.worker.submit(request_id, ids, adapter, params, label,
                               lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        except BaseException:
            if adapter is not None:
                self.registry.release(adapter)
            raise
        shape = _Shape(request_id, body["model"], chat, len(ids))
        if stream:
            return StreamingResponse(self._sse(queue, request_id, shape, include_usage), media_type="text/event-stream")
        return await self._collect(request, queue, request_id, shape)

    async def _collect(self, request: Request, queue: asyncio.Queue, request_id: str, shape: "_Shape") -> JSONResponse:
        while True:
            try:
                out: StepOutput = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.worker.abort(request_id)
                    return error_response(499, "client disconnected")
                continue
            if out.finished:
                if out.request.finish_reason == "error":
                    return error_response(500, "the engine failed while generating this request; retry")
                return JSONResponse(shape.full(out.request))

    async def _sse(self, queue: asyncio.Queue, request_id: str, shape: "_Shape", include_usage: bool) -> AsyncIterator[str]:
        done = False
        try:
            if shape.chat:
                yield _event(shape.chunk({"role": "assistant", "content": ""}, None))
            while not done:
                out: StepOutput = await queue.get()
                done = out.finished
                reason = out.request.finish_reason if done else None
                if out.text or done:
                    yield _event(shape.chunk({"content": out.text} if shape.chat else out.text, reason))
            if include_usage:
                yield _event({**shape.chunk(None, None), "choices": [], "usage": shape.usage(out.request)})
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away: free the slot
                self.worker.abort(request_id)

    # ---- admin ---------------------------------------------------------------------------------------
    async def admin_list(self, request: Request) -> JSONResponse:
        self._check_admin(request)
        return JSONResponse({"data": [
            {"name": e.name, "bytes": e.nbytes, "pinned": e.pinned, "requests": e.refs, "path": str(e.path or "")}
            for e in self.registry.entries.values()], "resident_bytes": self.registry.resident_bytes(),
            "max_bytes": self.registry.max_bytes})

    async def admin_load(self, request: Request) -> JSONResponse:
        self._check_admin(request)
        body = await _json_body(request)
        name, path, pin = body.get("name"), body.get("path"), body.get("pin", False)
        if not isinstance(name, str) or not isinstance(path, str) or not isinstance(pin, bool):
            raise RequestError("send {\"name\": str, \"path\": str (inside --adapter-dir), \"pin\": bool}", param="name")
        try:
            resolved = self.registry.allowed_path(path)
        except PermissionError as exc:
            raise RequestError(str(exc), param="path", status=403) from None
        except FileNotFoundError as exc:
            raise RequestError(str(exc), param="path", status=404) from None
        try:
            entry = await run_in_threadpool(self.registry.add, name, resolved, pin=pin)
        except ValueError as exc:
            raise RequestError(str(exc), param="name") from None
        return JSONResponse({"name": entry.name, "bytes": entry.nbytes, "pinned": entry.pinned})

    async def admin_unload(self, request: Request) -> JSONResponse:
        self._check_admin(request)
        name = request.path_params["name"]
        try:
            await run_in_threadpool(self.registry.unload, name)
        except KeyError as exc:
            raise RequestError(str(exc.args[0]), param="name", status=404) from None
        except RuntimeError as exc:
            raise RequestError(str(exc), param="name", status=409) from None
        return JSONResponse({"name": name, "unloaded": True})


async def _json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Shape:
    """OpenAI's response and chunk objects for one request."""

    def __init__(self, request_id: str, model: str, chat: bool, prompt_tokens: int) -> None:
        self.id, self.model, self.chat, self.prompt_tokens = request_id, model, chat, prompt_tokens
        self.created = int(time.time())

    def usage(self, request) -> dict:
        n = len(request.output_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self, request) -> dict:
        reason = request.finish_reason if request.finish_reason in ("stop", "length") else "stop"
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": request.text}, "logprobs": None,
                      "finish_reason": reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage(request)}
        choice = {"index": 0, "text": request.text, "logprobs": None, "finish_reason": reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage(request)}

    def chunk(self, piece: Any, reason: str | None) -> dict:
        if reason is not None and reason not in ("stop", "length"):
            reason = "stop"
        if self.chat:
            delta = piece if piece is not None else {}
            return {**self._head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        return {**self._head("text_completion"),
                "choices": [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}]}
