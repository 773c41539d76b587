"""The engine in a background thread, for the server: asyncio handlers submit requests and await outputs.

One thread owns the engine and steps it while there is work; each step holds the registry's model lock, so
adapters load and unload only between forwards. Outputs go back to each request's callback (from the server:
`loop.call_soon_threadsafe(queue.put_nowait, output)`). A request's adapter is released in the registry and
its metrics recorded when it finishes, for whatever reason (done, aborted by a disconnecting client, failed).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from .engine import Engine
from .request import StepOutput
from .sampling import SamplingParams

log = logging.getLogger("deltatune.serve")


class EngineWorker:
    def __init__(self, engine: Engine, registry=None, metrics=None) -> None:
        self.engine, self.registry, self.metrics = engine, registry, metrics
        self.lock = registry.lock if registry is not None else threading.RLock()
        self._subs: dict[str, tuple[Callable[[StepOutput], None], str]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="deltatune-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, request_id: str, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
               label: str, on_output: Callable[[StepOutput], None]) -> None:
        """Queue a request (raises RequestError if it cannot run); `on_output` is called from the engine thread."""
        self._subs[request_id] = (on_output, label)
        try:
            self.engine.add_request(prompt_ids, adapter, params, request_id=request_id, label=label)
        except BaseException:
            del self._subs[request_id]
            raise
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                continue
            try:
                with self.lock:
                    outputs = self.engine.prefill_step()
                self._dispatch(outputs)
                with self.lock:
                    outputs = self.engine.decode_step()
                self._dispatch(outputs)
            except Exception:  # a bug or out of memory: fail the batch, keep serving
                log.exception("engine step failed; failing %d requests", len(self.engine.running) + len(self.engine.waiting))
                with self.lock:
                    outputs = self.engine.fail_all()
                self._dispatch(outputs)

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            request = out.request
            sub = self._subs.pop(request.id, None) if out.finished else self._subs.get(request.id)
            if out.finished:
                if self.registry is not None and request.adapter is not None:
                    self.registry.release(request.adapter)
                if self.metrics is not None and sub is not None:
                    done = request.completion()
                    self.metrics.request_done(sub[1], request.finish_reason or "abort", len(request.prompt_ids),
                                              len(request.output_ids), done.first_token_s, done.total_s)
            if sub is not None:
                try:
                    sub[0](out)
                except Exception:  # a closed event loop must not stop the engine
                    log.exception("delivering output of %s failed", request.id)
