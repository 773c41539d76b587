"""The training data as the loop consumes it: tokenized train/eval sets (`load_data`) and this process's
micro-batches, epoch after epoch, from a saved data position (`BatchStream`, so a resumed run sees the batches
an uninterrupted one would have)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.config import ConfigError
from ..data import batch_order, load_records, pack, split_eval, tokenize
from .checkpoint import DataPosition
from .config import TrainConfig
from .distributed import World, shard


@dataclass
class TrainData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    pad_id: int


def load_data(cfg: TrainConfig, tokenizer: Any, world: World) -> TrainData:
    if cfg.data.train is None:
        raise ConfigError("data.train is not set; give a .jsonl, .json or .parquet file (--data.train path)")
    train_records = load_records(cfg.data.train)
    eval_records: list[dict[str, Any]] = []
    if cfg.data.eval:
        eval_records = load_records(cfg.data.eval)
    elif cfg.data.eval_fraction > 0:  # hold out records, not tokenized chunks, so no text lands on both sides
        train_records, eval_records = split_eval(train_records, cfg.data.eval_fraction, cfg.seed)
    train_set = _tokenized(train_records, cfg.data.train, cfg, tokenizer, world)
    eval_set = _tokenized(eval_records, cfg.data.eval or f"{cfg.data.train} (held out)", cfg, tokenizer, world)
    if cfg.data.packing:
        train_set = pack(train_set, cfg.data.max_length)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return TrainData(list(train_set), list(eval_set), pad_id)


def _tokenized(records: list[dict[str, Any]], source: str, cfg: TrainConfig, tokenizer: Any, world: World) -> list[dict[str, Any]]:
    if not records:
        return []
    examples, report = tokenize(records, tokenizer, format=cfg.data.format, max_length=cfg.data.max_length,
                                overlong=cfg.data.overlong, source=source)
    if world.is_main:
        print(report.summary(), flush=True)
    return list(examples)



class BatchStream:
    """This process's micro-batches (example indices), epoch after epoch, from a saved data position."""

    def __init__(self, examples: list[dict[str, Any]], cfg: TrainConfig, world: World, position: DataPosition) -> None:
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.cfg, self.world, self.position = cfg, world, position
        self._order: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._order is None or self._order[0] != epoch:
            order = batch_order(self.lengths, self.cfg.batch_size * self.world.size,
                                group_by_length=self.cfg.data.group_by_length, seed=self.cfg.seed, epoch=epoch)
            order = [b for b in order if len(b) >= self.world.size]  # every process needs an example
            if not order:
                raise ConfigError(f"data.train has {len(self.lengths)} examples, fewer than the {self.world.size} processes")
            self._order = (epoch, order)
        return self._order[1]

    def next(self) -> list[int]:
        epoch, index = self.position.epoch, self.position.batch
        if index >= len(self._batches(epoch)):
            epoch, index = epoch + 1, 0
        self.position = DataPosition(epoch, index + 1)
        return shard(self._batches(epoch)[index], self.world)
