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
import dataclasses
import hmac
import json
import logging
import math
import time
import uuid
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .admin import AdminRoutes
from .engine import Engine
from .fields import check_fields
from .guards import AccessLog, Limits, guarded_protocol
from .request import StepOutput
from .responses import Shape, event, logprobs_wanted
from .metrics import CONTENT_TYPE_LATEST, ServeMetrics
from .blends import blend_name, check_weights
from .registry import AdapterRegistry
from .sampling import RequestError, SamplingParams
from .worker import EngineWorker

log = logging.getLogger("deltatune.serve")


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Server(AdminRoutes):
    MAX_N = 16  # choices per request at most

    def __init__(self, engine: Engine, registry: AdapterRegistry, *, base_name: str = "base",
                 api_key: str | None = None, admin_token: str | None = None, metrics: ServeMetrics | None = None,
                 limits: Limits | None = None) -> None:
        self.engine, self.registry, self.tokenizer = engine, registry, engine.tokenizer
        self.limits = limits or Limits()
        if registry.check is None:  # refuse an adapter the engine cannot run when it loads, not per request
            registry.check = engine.check_adapter
        self.base_name, self.api_key, self.admin_token = base_name, api_key, admin_token
        self.metrics = metrics or ServeMetrics()
        registry.metrics = self.metrics
        self.metrics.watch(lambda: len(engine.waiting), lambda: len(engine.running),
                           lambda: len(registry.entries), registry.resident_bytes)
        if engine.prefix_cache is not None:
            self.metrics.watch_prefix(engine.prefix_cache)
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
        if self.admin_token:  # vLLM's spelling of the same guarded admin path
            routes += [Route("/v1/load_lora_adapter", self.vllm_load, methods=["POST"]),
                       Route("/v1/unload_lora_adapter", self.vllm_unload, methods=["POST"])]
        routes += [Route("/tokenize", self.tokenize, methods=["POST"]), Route("/detokenize", self.detokenize, methods=["POST"])]
        handlers = {HTTPException: self._http_error, RequestError: self._request_error, ClientDisconnect: self._gone,
                    Exception: self._internal_error}
        access = Middleware(AccessLog, max_body_bytes=self.limits.max_body_bytes, on_reject=self.metrics.request_rejected)
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan, middleware=[access])

    def uvicorn_config(self, host: str = "127.0.0.1", port: int = 8000, **kwargs):
        """uvicorn's Config for this server: its limits enforced by the HTTP protocol (guards.py)."""
        import uvicorn

        protocol = guarded_protocol(self.limits, self.metrics.request_rejected)
        return uvicorn.Config(self.app(), host=host, port=port, http=protocol, timeout_keep_alive=self.limits.keep_alive,
                              log_level=kwargs.pop("log_level", "warning"), **kwargs)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.worker.start()
        try:
            yield
        finally:  # uvicorn has stopped accepting and waited for open requests: the engine has drained
            left = len(self.engine.running) + len(self.engine.waiting)
            self.worker.stop()
            log.warning("deltatune serve: shut down, every open request answered (%d left unfinished)", left)

    # ---- errors and auth -----------------------------------------------------------------------------
    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        self.metrics.request_rejected(exc.status_code, None)
        return error_response(exc.status_code, str(exc.detail))

    async def _request_error(self, request: Request, exc: RequestError) -> JSONResponse:
        self.metrics.request_rejected(exc.status, exc.code)
        return error_response(exc.status, str(exc), param=exc.param, code=exc.code)

    async def _gone(self, request: Request, exc: ClientDisconnect) -> Response:
        self.metrics.request_rejected(499, "client_disconnected")
        return error_response(499, "the client went away before its request arrived whole")

    async def _internal_error(self, request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        self.metrics.request_rejected(500, "internal_error")
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
        names = [self.base_name] * (self.registry.base_owner is None) + \
            [n for n in self.registry.available() if n != self.base_name]
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": self.created, "owned_by": "deltatune",
             "root": self.base_name, "parent": None if n == self.base_name else self.base_name} for n in names]})

    # ---- generation ----------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        self._check_key(request)
        body = await self._json_body(request)
        check_fields(body, chat=False)
        ids = await run_in_threadpool(self._prompt_ids, body.get("prompt"))  # tokenizing off the event loop
        return await self._generate(request, body, ids, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        self._check_key(request)
        body = await self._json_body(request)
        check_fields(body, chat=True)
        ids = await run_in_threadpool(self._chat_ids, body.get("messages"))
        return await self._generate(request, body, ids, chat=True)

    async def _json_body(self, request: Request) -> dict:
        """The body as a JSON object, read at most max_body_bytes (413 beyond, before reading the rest)."""
        limit, chunks, size = self.limits.max_body_bytes, [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"the request body exceeds {limit} bytes, the most accepted", code="body_too_large",
                                   status=413)
            chunks.append(chunk)
        raw = b"".join(chunks)
        return await run_in_threadpool(_parse_json, raw) if size > 65536 else _parse_json(raw)

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
                if not math.isfinite(blend[name.strip()]):
                    raise RequestError(f"blend weight of {name.strip()!r} must be finite, got {weight!r}", param="model")
        if blend is not None:
            if not isinstance(blend, dict):
                raise RequestError("adapters must be an object {name: weight}", param="adapters")
            blend = check_weights(blend)  # finite numbers, 400 naming the field otherwise
            return blend, blend_name(blend)
        if model == self.base_name and self.registry.base_owner is not None:
            raise RequestError(f"the base model {model!r} is not served: the weights in memory are adapter "
                               f"{self.registry.base_owner!r}'s own 4-bit base (LoftQ/QPiSSA)", param="model",
                               code="model_not_found", status=404)
        return (None, "base") if model == self.base_name else (model, model)

    def _params(self, body: dict, prompt_len: int, chat: bool) -> SamplingParams:
        max_tokens = body.get("max_completion_tokens") if chat else None
        max_tokens = max_tokens if max_tokens is not None else body.get("max_tokens", None if chat else 16)
        if max_tokens is None:
            max_tokens = max(1, self.engine.max_model_len - prompt_len)
        stop = body.get("stop")
        stop = [] if stop is None else stop
        if not isinstance(stop, (str, list)):
            raise RequestError("stop must be a string or a list of strings", param="stop")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise RequestError("ignore_eos must be true or false", param="ignore_eos")
        get = lambda key, default: default if body.get(key) is None else body[key]  # noqa: E731
        return SamplingParams(max_new_tokens=max_tokens, temperature=get("temperature", 1.0), top_p=get("top_p", 1.0),
                              seed=body.get("seed"), stop=(stop,) if isinstance(stop, str) else tuple(stop),
                              ignore_eos=ignore_eos, top_k=get("top_k", 0), presence_penalty=get("presence_penalty", 0.0),
                              frequency_penalty=get("frequency_penalty", 0.0), logprobs=logprobs_wanted(body, chat),
                              constraint=self._constraint(body.get("response_format")))

    def _constraint(self, response_format: Any):
        """None for free text; a JSON constraint for response_format json_object / json_schema."""
        if response_format is None:
            return None
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "text":
            return None
        if kind in ("json_object", "json_schema"):
            from .constrain import json_constraint  # noqa: PLC0415

            return json_constraint(response_format, self.tokenizer, self.engine.eos_ids)
        raise RequestError("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": "
                           "\"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}", param="response_format")

    def _choice_params(self, params: SamplingParams, n: int) -> list[SamplingParams]:
        """n choices: a seeded request gives choice i the seed seed + i (each reproducible alone)."""
        if n == 1:
            return [params]
        return [dataclasses.replace(params, seed=None if params.seed is None else params.seed + i) for i in range(n)]

    async def _generate(self, request: Request, body: dict, ids: list[int], *, chat: bool) -> Response:
        spec, label = self._model_spec(body)
        params = self._params(body, len(ids), chat)
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.MAX_N:
            raise RequestError(f"n must be an integer in [1, {self.MAX_N}], got {n!r}", param="n")
        if body.get("best_of") not in (None, 1, n):
            raise RequestError("best_of must equal n (or be omitted): choices are not ranked here", param="best_of")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("stream_options must be an object, e.g. {\"include_usage\": true}", param="stream_options")
        include_usage = bool(options.get("include_usage")) if stream else False
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        ids_of = [f"{request_id}-{i}" if n > 1 else request_id for i in range(n)]
        submitted: list[str] = []
        try:
            for sub_id, choice in zip(ids_of, self._choice_params(params, n)):
                adapter = await run_in_threadpool(self.registry.acquire, spec) if spec is not None else None
                try:
                    self.worker.submit(sub_id, ids, adapter, choice, label,
                                       lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
                except BaseException:
                    if adapter is not None:
                        self.registry.release(adapter)
                    raise
                submitted.append(sub_id)
        except BaseException:
            for sub_id in submitted:
                self.worker.abort(sub_id)
            raise
        shape = Shape(request_id, body["model"], chat, len(ids), self.tokenizer, {s: i for i, s in enumerate(ids_of)})
        if stream:
            return StreamingResponse(self._sse(queue, ids_of, shape, include_usage), media_type="text/event-stream")
        return await self._collect(request, queue, ids_of, shape)

    async def _collect(self, request: Request, queue: asyncio.Queue, ids_of: list[str], shape: Shape) -> JSONResponse:
        done: dict[str, Any] = {}
        while len(done) < len(ids_of):
            try:
                out: StepOutput = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    for sub_id in ids_of:
                        self.worker.abort(sub_id)
                    return error_response(499, "client disconnected")
                continue
            if out.finished:
                if out.request.finish_reason == "error":
                    for sub_id in ids_of:
                        self.worker.abort(sub_id)
                    return error_response(500, "the engine failed while generating this request; retry")
                done[out.request.id] = out.request
        return JSONResponse(shape.full([done[s] for s in ids_of]))

    async def _sse(self, queue: asyncio.Queue, ids_of: list[str], shape: Shape, include_usage: bool) -> AsyncIterator[str]:
        finished: dict[str, Any] = {}
        try:
            if shape.chat:
                for i in range(len(ids_of)):
                    yield event(shape.chunk(i, {"role": "assistant", "content": ""}, None))
            while len(finished) < len(ids_of):
                out: StepOutput = await queue.get()
                index = shape.index[out.request.id]
                reason = out.request.finish_reason if out.finished else None
                if out.finished:
                    finished[out.request.id] = out.request
                if out.text or out.finished or (out.token_ids and out.request.params.logprobs is not None):
                    piece = {"content": out.text} if shape.chat else out.text
                    yield event(shape.chunk(index, piece, reason, shape.logprobs(out.request, out.logprobs)))
            if include_usage:
                yield event({**shape.chunk(0, None, None), "choices": [],
                             "usage": shape.usage([finished[s] for s in ids_of])})
            yield "data: [DONE]\n\n"
        finally:
            for sub_id in ids_of:  # the client went away: free the slots
                if sub_id not in finished:
                    self.worker.abort(sub_id)

def _parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body
