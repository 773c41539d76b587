"""The config side of the virtual-token methods (prompt tuning, P-tuning, prefix tuning): the fields peft's
prompt-learning configs share (`PromptLearningConfig`), and how they are filled from the model at attach
(`resolve_prompt_learning`: token_dim, num_layers, num_attention_heads; `input_embedding`, `text_config_int`).
The part, its hooks and the mixed-batch layout are `methods/virtual_tokens.py`, which re-exports these names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import nn

from ..core.config import AdapterConfig, ConfigError, check_positive_int

_NO_TARGETS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass(frozen=True)
class PromptLearningConfig(AdapterConfig):
    """peft's PromptLearningConfig fields: num_virtual_tokens (p) and the model's sizes, filled at attach."""

    method_name: ClassVar[str] = "prompt learning"  # how errors call the method
    task_type: str | None = "CAUSAL_LM"  # what peft's PeftModel.from_pretrained dispatches on
    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def validate(self) -> None:
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for key in ("token_dim", "num_attention_heads", "num_layers"):
            if getattr(self, key) is not None:
                check_positive_int(key, getattr(self, key))
        method = self.method_name
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError(f"num_transformer_submodules={self.num_transformer_submodules!r}: deltatune's {method} "
                              "supports decoder-only models (1); encoder-decoder prompts (2) are not supported")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ConfigError(f"task_type={self.task_type!r}: deltatune's {method} supports causal LMs "
                              "(task_type 'CAUSAL_LM')")
        given = [key for key in _NO_TARGETS if getattr(self, key) is not None]
        if given:
            raise ConfigError(f"{given[0]} is set, but {method} adds virtual tokens and targets no modules; remove it")

    def describe(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        return {"prompt": f"{self.num_virtual_tokens} virtual tokens of {self.token_dim} dims",
                "targets": "none (virtual tokens at the input)"}

    def check_file(self, tensors: Mapping[str, Any]) -> str:
        """The prompt's rows against num_virtual_tokens before attach allocates p x token_dim (a file saying
        2e7 would take 46 GB first)."""
        prompt = tensors.get("prompt_embeddings")
        if prompt is not None and prompt.dim() == 2 and prompt.shape[0] != self.num_virtual_tokens:
            return (f"num_virtual_tokens is {self.num_virtual_tokens}, but the file's prompt_embeddings has "
                    f"{prompt.shape[0]} rows; the config or the weights are corrupted")
        return ""

    def to_dict(self) -> dict[str, Any]:
        """peft's keys exactly: no target keys (prompt learning has none)."""
        out = super().to_dict()
        for key in _NO_TARGETS:
            out.pop(key)
        return out


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The model's (base) input embedding: a LoRA-adapted one is looked through to its base layer."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    embedding = getattr(embedding, "base_layer", embedding)
    if not isinstance(embedding, nn.Embedding):
        raise ConfigError(f"virtual tokens need a model whose get_input_embeddings() is an nn.Embedding; "
                          f"{type(model).__name__} gives {type(embedding).__name__}")
    return embedding


def resolve_prompt_learning(model: nn.Module, config: PromptLearningConfig, **extra: Any) -> PromptLearningConfig:
    """The config with token_dim, num_layers, num_attention_heads and num_transformer_submodules from the model
    (peft's _prepare_prompt_learning_config), plus `extra` fields; a token_dim that does not fit is an error."""
    model_config = getattr(model, "config", None)
    method = config.method_name
    if getattr(model_config, "is_encoder_decoder", False):
        raise ConfigError(f"{type(model).__name__} is an encoder-decoder model; deltatune's {method} supports "
                          "decoder-only causal LMs")
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and not can_generate():
        raise ConfigError(f"{type(model).__name__} is not a causal LM (it cannot generate); deltatune's {method} "
                          "supports causal LMs (a classification head would read the wrong positions)")
    dim = input_embedding(model).embedding_dim
    if config.token_dim is not None and config.token_dim != dim and "token_dim" not in extra:
        raise ConfigError(f"token_dim is {config.token_dim}, but the model's input embeddings have {dim} dimensions; "
                          "this prompt was made for another model (or set token_dim to null)")
    return config.replace(**{
        "token_dim": dim, "num_transformer_submodules": 1,
        "num_layers": config.num_layers or text_config_int(model, "num_hidden_layers", "num_layers", "n_layer"),
        "num_attention_heads": config.num_attention_heads or text_config_int(model, "num_attention_heads", "n_head", "num_heads"),
        **extra,
    })


def text_config_int(model: nn.Module, *keys: str) -> int | None:
    """The first of `keys` the model's (text) config holds as an int."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return next((getattr(text, k) for k in keys if isinstance(getattr(text, k, None), int)), None)
