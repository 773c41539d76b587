"""Training data: files to records, records to token ids with loss masks, packing, batching.

    records = load_records("train.jsonl")                       # .jsonl / .json / .parquet
    examples, report = tokenize(records, tokenizer, format="auto", max_length=512, overlong="truncate")
    print(report.summary())
    rows = pack(examples, 512)                                  # optional; run with use_cache=False
    for batch in batch_order([len(r["input_ids"]) for r in rows], 4, group_by_length=True, seed=0, epoch=0):
        tensors = collate([rows[i] for i in batch], pad_id=tokenizer.pad_token_id)
"""
from .chat import IGNORE_INDEX
from .encode import Example, TokenizeReport, tokenize
from .order import batch_order, split_eval
from .packing import block_diagonal_mask, collate, pack
from .records import DataError, check_records, detect_format, load_records

__all__ = [
    "IGNORE_INDEX", "DataError", "Example", "TokenizeReport", "batch_order", "block_diagonal_mask",
    "check_records", "collate", "detect_format", "load_records", "pack", "split_eval", "tokenize",
]
