"""Multi-adapter serving: a continuous-batching engine, an adapter registry, an OpenAI-compatible server."""
from .engine import Engine, check_servable
from .request import Completion, Request, StepOutput
from .sampling import RequestError, SamplingParams

__all__ = ["Engine", "Completion", "Request", "StepOutput", "SamplingParams", "RequestError", "check_servable"]
