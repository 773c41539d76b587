"""P-tuning (Liu et al. 2021, arXiv:2103.10385, "GPT Understands, Too"): virtual tokens made by a prompt encoder.

    E (p × e, trainable) ──► encoder ──► V (p × e) ──► [V ; x] (B, p+T, e) ──► frozen decoder
                              MLP:  Linear(e, h) ─ ReLU ─ Linear(h, h) ─ ReLU ─ Linear(h, e)
                              LSTM: biLSTM(e → h, `encoder_num_layers`) ─ Linear(2h, 2h) ─ ReLU ─ Linear(2h, e)

peft's PromptEncoder, prepended as peft does: V goes before the input embeddings (the paper's anchors and
template are not modelled; peft has none either). Everything but V (hooks, mask, labels, positions, decoding
steps, mixed batches with prompt tuning, LoRA and base rows) is the virtual-token base
(`deltatune.methods.virtual_tokens`), shared with prompt tuning.

The file holds V, not the encoder (peft's `prompt_embeddings`, the encoder's output): it is derived.
- Inference form (`load_adapter`, inference_mode): the part holds V itself, exactly as in the file.
- Trainable form (`attach`, `load_adapter(trainable=True)`): the part keeps the encoder, whose output is what
  trains. Loading a file into it cannot recover the encoder's weights (only its output was saved), so the part
  keeps a fresh encoder and a frozen offset, V = encoder(E) + (V_file − encoder(E) at load): the rows start
  from the file's V (to rounding) and training goes on through the encoder. peft instead copies V_file into E
  and runs the fresh encoder on it, which silently changes V.
- Checkpoints of `deltatune train` keep the live tensors (E, the encoder, the offset), so a resumed run
  continues exactly; the adapter file is written through the method's `save_view` as V.

Learning rate: 1e-3 (peft's P-tuning examples; the encoder is trained like weights, not like prompt tuning's
free embeddings). Not supported: encoder-decoder models, task types other than causal LM, packed rows,
per-token routing; `encoder_num_layers` other than 2 with the MLP encoder (peft ignores it with a warning).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ..core.config import ConfigError, check_positive_int
from ..core.registry import register
from .virtual_tokens import PromptLearningConfig, VirtualPart, file_view, input_embedding, resolve_prompt_learning

_ENCODERS = ("MLP", "LSTM")


@dataclass(frozen=True)
class PromptEncoderConfig(PromptLearningConfig):
    """peft's PromptEncoderConfig (peft_type "P_TUNING"), written with the same keys.

    encoder_reparameterization_type: "MLP" (default) or "LSTM".
    encoder_hidden_size: h (None: token_dim, filled at attach as peft does).
    encoder_num_layers: LSTM layers (2); the MLP always has two hidden layers.
    encoder_dropout: dropout between LSTM layers (0.0).
    """

    peft_type: ClassVar[str] = "P_TUNING"
    method_name: ClassVar[str] = "P-tuning"
    recommended_lr: ClassVar[float] = 1e-3  # peft's P-tuning examples

    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type not in _ENCODERS:
            raise ConfigError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM' (peft's prompt encoders), "
                              f"got {self.encoder_reparameterization_type!r}")
        if self.encoder_hidden_size is not None:
            check_positive_int("encoder_hidden_size", self.encoder_hidden_size)
        check_positive_int("encoder_num_layers", self.encoder_num_layers)
        if self.encoder_reparameterization_type == "MLP" and self.encoder_num_layers != 2:
            raise ConfigError(f"encoder_num_layers={self.encoder_num_layers} with the MLP encoder: peft's MLP always "
                              "has two hidden layers (it ignores this value); set 2, or use the LSTM encoder")
        if isinstance(self.encoder_dropout, bool) or not isinstance(self.encoder_dropout, (int, float)) \
                or not 0 <= self.encoder_dropout < 1:
            raise ConfigError(f"encoder_dropout must be a number in [0, 1), got {self.encoder_dropout!r}")


def resolve(model: nn.Module, config: PromptEncoderConfig) -> PromptEncoderConfig:
    config = resolve_prompt_learning(model, config)
    return config.replace(encoder_hidden_size=config.encoder_hidden_size or config.token_dim)


class PromptEncoder(nn.Module):
    """peft's PromptEncoder in training form: E (p, e) and the MLP or LSTM head, built in peft's order."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        e, h, self.kind = config.token_dim, config.encoder_hidden_size, config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.num_virtual_tokens, e)
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(e, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, e))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(e, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, e))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)  # (1, p, e): every virtual token, in order
        if self.kind == "LSTM":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]  # (p, e)


class EncodedTokens(VirtualPart):
    """P-tuning's part: V = encoder(E) + offset (trainable form), or V itself (inference form)."""

    def __init__(self, model: nn.Module, config: PromptEncoderConfig, name: str) -> None:
        super().__init__(model, name, config.num_virtual_tokens)
        device = input_embedding(model).weight.device
        if config.inference_mode:
            self.prompt_embeddings = nn.Parameter(torch.zeros(config.num_virtual_tokens, config.token_dim, device=device))
            self.prompt_encoder = None
        else:
            self.prompt_encoder = PromptEncoder(config).to(device)
            self.register_buffer("offset", torch.zeros(config.num_virtual_tokens, config.token_dim, device=device))

    def row_embeddings(self) -> torch.Tensor:
        if self.prompt_encoder is None:
            return self.prompt_embeddings
        return self.prompt_encoder() + self.offset

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.prompt_encoder is None:
            return {"prompt_embeddings": self.prompt_embeddings}
        return {**{f"prompt_encoder.{k}": v for k, v in self.prompt_encoder.state_dict(keep_vars=True).items()},
                "prompt_encoder.offset": self.offset}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        if self.prompt_encoder is None:
            return self.tensors()
        with torch.no_grad():
            return {"prompt_embeddings": self.row_embeddings().detach()}

    def live_from_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.prompt_encoder is None:
            return tensors
        return self._live_with_offset(tensors, self.prompt_encoder, self.offset, "prompt_encoder.offset")


def inject(model: nn.Module, config: PromptEncoderConfig, name: str) -> EncodedTokens:
    return EncodedTokens(model, config, name)


register(PromptEncoderConfig, inject=inject, resolve=resolve, save_view=file_view, readers=("peft", "deltatune"))
