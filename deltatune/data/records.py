"""Reading training files into records, and checking that every record has the keys of its format.

Three on-disk forms, one record per example:

    train.jsonl     one JSON object per line (blank lines are skipped)
    train.json      a list of objects, or {"data": [...]}
    train.parquet   one row per example (needs pyarrow)

Three record formats (`data.format`):

    messages           {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    prompt_completion  {"prompt": "...", "completion": "..."}
    text               {"text": "..."}                       (continued pretraining)

Every error names the file and the line (JSONL) or the record index (JSON, Parquet), because a bad row
in a 100k-line file is otherwise impossible to find.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence

Format = Literal["messages", "prompt_completion", "text"]
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A training file or record deltatune cannot use; the message names the file and line or index."""


class Records(list):
    """A list of record dicts that remembers where each came from, so later errors can say `file:line`.

    It is a plain `list[dict]` to every caller; `locations[i]` is the human address of record i.
    """

    def __init__(self, items: Sequence[dict[str, Any]], source: str, locations: Sequence[str]) -> None:
        super().__init__(items)
        self.source = source
        self.locations = list(locations)


def where(records: Sequence[dict[str, Any]], index: int, source: str = "data") -> str:
    """`train.jsonl:12` for records read by `load_records`, else `<source> record 12` (0-based index)."""
    locations = getattr(records, "locations", None)
    if locations is not None and index < len(locations):
        return locations[index]
    return f"{source} record {index}"


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a .jsonl, .json or .parquet file, in file order; raises DataError on anything odd."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory; give one file)" if path.is_dir() else ""
        raise DataError(f"data file {path} does not exist{hint}; set data.train / data.eval to a .jsonl, .json or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        items, locations = _read_jsonl(path)
    elif suffix == ".json":
        items = _read_json(path)
        locations = [f"{path} record {i}" for i in range(len(items))]
    elif suffix == ".parquet":
        items = _read_parquet(path)
        locations = [f"{path} row {i}" for i in range(len(items))]
    else:
        raise DataError(f"{path}: unknown data file type {suffix or '(no extension)'!r}; use one of {', '.join(SUFFIXES)}")
    for item, location in zip(items, locations):
        if not isinstance(item, dict):
            raise DataError(f"{location}: a record must be a JSON object like {{\"text\": ...}}, found {type(item).__name__}")
    if not items:
        raise DataError(f"{path} has no examples")
    return Records(items, str(path), locations)


def _decode(raw: bytes, path: Path, line: int, offset: int = 0) -> str:
    """UTF-8 text of `raw` (a leading BOM dropped); anything else is a DataError naming the file and line."""
    try:
        return raw.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as exc:
        line += raw[: exc.start].count(b"\n")
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None


def _read_jsonl(path: Path) -> tuple[list[Any], list[str]]:
    items, locations = [], []
    with _open(path) as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            line = _decode(raw, path, number, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{number}: invalid JSON: nested too deeply") from None
            locations.append(f"{path}:{number}")
    return items, locations


def _open(path: Path):
    try:
        return path.open("rb")
    except OSError as exc:
        raise DataError(f"data file {path} cannot be read: {exc.strerror or exc}") from None


def _read_json(path: Path) -> list[Any]:
    with _open(path) as handle:
        text = _decode(handle.read(), path, 1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "; if it holds one object per line, rename it to .jsonl" if exc.msg == "Extra data" else ""
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}){hint}") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON: nested too deeply") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return data["data"]
    if isinstance(data, list):
        return data
    raise DataError(f"{path}: expected a list of records or {{\"data\": [...]}}, found {type(data).__name__}"
                    + (f" with keys {sorted(map(str, data))[:8]}" if isinstance(data, dict) else ""))


def _read_parquet(path: Path) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; `pip install pyarrow` or convert the file to JSONL") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/OSError family
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None


def detect_format(records: Sequence[dict[str, Any]], source: str = "data") -> Format:
    """The format of `records` for `data.format: auto`, from the first record's keys; every record is checked.

    Precedence when a record has several: messages, then prompt+completion, then text.
    """
    if not records:
        raise DataError(f"{getattr(records, 'source', source)} has no examples")
    first = records[0]
    for name, keys in FORMAT_KEYS.items():
        if all(first.get(key) is not None for key in keys):
            check_records(records, name, source)  # type: ignore[arg-type]
            return name  # type: ignore[return-value]
    raise DataError(
        f"{where(records, 0, source)}: cannot tell the data format from keys {sorted(first)[:10]}; a record needs "
        "`messages`, `prompt` and `completion`, or `text` (or set data.format explicitly)"
    )


def check_records(records: Sequence[dict[str, Any]], format: Format, source: str = "data") -> None:
    """Raise DataError at the first record lacking a key of `format` or holding a value of the wrong type."""
    if format not in FORMAT_KEYS:
        raise DataError(f"data.format must be one of auto, {', '.join(FORMAT_KEYS)}; got {format!r}")
    keys = FORMAT_KEYS[format]
    for index, record in enumerate(records):
        for key in keys:
            if record.get(key) is None:
                present = ", ".join(sorted(record)[:10]) or "none"
                raise DataError(f"{where(records, index, source)}: missing key {key!r} for format {format} (keys present: {present})")
        if format == "messages":
            _check_messages(record["messages"], where(records, index, source))
        else:
            for key in keys:
                if not isinstance(record[key], str):
                    raise DataError(f"{where(records, index, source)}: {key!r} must be a string, found {type(record[key]).__name__}")


def _check_messages(messages: Any, location: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{location}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{location}: messages[{turn}] must be an object with a string 'role'")
        if not isinstance(message.get("content"), str):
            found = type(message.get("content")).__name__ if "content" in message else "nothing"
            raise DataError(f"{location}: messages[{turn}]['content'] must be a string, found {found}")
