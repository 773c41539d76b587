"""Constrained decoding for `response_format` (a JSON schema, or any JSON object): at each step only the tokens
that keep the output a prefix of valid JSON for the schema may be chosen, and end-of-sequence only once the
value is complete.

A character-level pushdown recognizer (immutable frames on a tuple stack, so a state branches for free) walks
a trie of the vocabulary's token strings: a token is allowed iff every character of it is accepted in turn.
Inside a free string nearly every token is allowed, so those "plain" tokens (no quote, backslash or control
character) are admitted by their length alone and only the tokens with a special character are walked.
The output is compact JSON (no whitespace between tokens of the grammar), which also keeps a model from
spending its budget on spaces. Supported schema keywords: type (one or a list), properties, required,
additionalProperties (extra properties are never generated), items, minItems, maxItems, enum, const,
minLength, maxLength; descriptive ones (title, description, ...) are ignored; any other is refused by name.
Strings without maxLength stop at 256 characters, arrays without maxItems at 64 items, integers at 18 digits,
so the output always ends. An output cut by max_tokens is a prefix of valid JSON, not valid JSON.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import torch

from .sampling import RequestError

MAX_STRING, MAX_ITEMS, MAX_DIGITS = 256, 64, 18
_IGNORED = {"title", "description", "default", "examples", "$schema", "$id", "strict", "$comment"}
_KNOWN = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const",
          "minLength", "maxLength"}
ANY = ("any",)


def compile_schema(schema: Any, where: str = "schema") -> tuple:
    """A schema as nested tuples the recognizer reads; RequestError naming what is not supported."""
    if schema is True or schema == {}:
        return ANY
    if not isinstance(schema, dict):
        raise RequestError(f"response_format: {where} must be an object", param="response_format")
    unknown = sorted(set(schema) - _KNOWN - _IGNORED)
    if unknown:
        raise RequestError(f"response_format: {where} uses {unknown[0]!r}, which constrained decoding does not "
                           f"support (supported: {', '.join(sorted(_KNOWN))})", param="response_format")
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        return ("lit", tuple(json.dumps(v, separators=(",", ":")) for v in values))
    kind = schema.get("type")
    if isinstance(kind, list):
        return ("union", tuple(compile_schema({**schema, "type": k}, where) for k in kind))
    if kind == "object" or (kind is None and "properties" in schema):
        props = {k: compile_schema(v, f"{where}.properties.{k}") for k, v in (schema.get("properties") or {}).items()}
        required = frozenset(schema.get("required") or ())
        if not required <= set(props):
            raise RequestError(f"response_format: {where}.required names properties it does not define",
                               param="response_format")
        return ("object", tuple(props.items()), required) if props or "properties" in schema else ANY_OBJECT
    if kind == "array":
        return ("array", compile_schema(schema.get("items", True), f"{where}.items"), int(schema.get("minItems", 0)),
                int(schema.get("maxItems", MAX_ITEMS)))
    if kind == "string":
        return ("string", int(schema.get("minLength", 0)), int(schema.get("maxLength", MAX_STRING)))
    if kind in ("integer", "number"):
        return (kind,)
    if kind == "boolean":
        return ("lit", ("true", "false"))
    if kind == "null":
        return ("lit", ("null",))
    if kind is None:
        return ANY
    raise RequestError(f"response_format: {where}.type {kind!r} is not a JSON schema type", param="response_format")


ANY_OBJECT = ("object", None, frozenset())


# ---- the recognizer: a state is a tuple of stacks (alternatives); a stack is a tuple of frames ----------------
def _start(rest: tuple, node: tuple, c: str) -> list[tuple]:
    kind = node[0]
    if kind == "union":
        return [s for alt in node[1] for s in _start(rest, alt, c)]
    if kind == "any":
        alts = [ANY_OBJECT, ("array", ANY, 0, MAX_ITEMS), ("string", 0, MAX_STRING), ("number",),
                ("lit", ("true", "false", "null"))]
        return [s for alt in alts for s in _start(rest, alt, c)]
    if kind == "object":
        return [rest + (("obj", node, "start", frozenset(), None),)] if c == "{" else []
    if kind == "array":
        return [rest + (("arr", node, "start", 0),)] if c == "[" else []
    if kind == "string":
        return [rest + (("str", node[1], node[2], 0, False, None),)] if c == '"' else []
    if kind in ("integer", "number"):
        return _feed(rest + (("num", kind == "integer", "begin", 0),), c)
    if kind == "lit":
        return _feed(rest + (("lit", node[1], 0, None),), c)
    raise AssertionError(kind)


def _done(stack: tuple, matched: str | None = None) -> tuple:
    """The stack after the value on top of it (now popped) ended; `matched`: the literal a key matched."""
    if not stack:
        return stack
    top = stack[-1]
    if top[0] == "obj":
        _, node, phase, seen, key = top
        if phase == "key":
            return stack[:-1] + (("obj", node, "colon", seen, matched and json.loads(matched)),)
        return stack[:-1] + (("obj", node, "after", seen, None),)
    if top[0] == "arr":
        return stack[:-1] + (("arr", top[1], "after", top[3]),)
    raise AssertionError(top)


def _feed(stack: tuple, c: str) -> list[tuple]:
    """Every stack reachable from `stack` by reading character c."""
    if not stack:
        return []  # the value is complete: nothing may follow
    top, rest = stack[-1], stack[:-1]
    kind = top[0]
    if kind == "val":
        return _start(rest, top[1], c)
    if kind == "lit":
        _, options, pos, tag = top
        options = tuple(o for o in options if len(o) > pos and o[pos] == c)
        out = [rest + (("lit", tuple(o for o in options if len(o) > pos + 1), pos + 1, tag),)] \
            if any(len(o) > pos + 1 for o in options) else []
        out += [_done(rest, o) for o in options if len(o) == pos + 1]
        return out
    if kind == "str":
        _, least, most, count, escaped, tag = top
        if escaped:
            return [rest + (("str", least, most, count + 1, False, tag),)] if c in '"\\/bfnrt' else []
        if c == '"':
            return [_done(rest)] if count >= least else []
        if c == "\\":
            return [rest + (("str", least, most, count, True, tag),)] if count < most else []
        if ord(c) < 0x20 or count >= most:
            return []
        return [rest + (("str", least, most, count + 1, False, tag),)]
    if kind == "num":
        return _feed_number(top, rest, c)
    if kind == "obj":
        return _feed_object(top, rest, c)
    if kind == "arr":
        _, node, phase, count = top
        items, least, most = node[1], node[2], node[3]
        if phase in ("start", "after") and c == "]" and count >= least:
            return [_done(rest)]
        if phase == "after" and c == "," and count < most:
            return [rest + (("arr", node, "value", count),)]
        if phase in ("start", "value") and count < most:
            return _start(rest + (("arr", node, "item", count + 1),), items, c)
        return []
    raise AssertionError(kind)


def _feed_number(top: tuple, rest: tuple, c: str) -> list[tuple]:
    _, integer, phase, digits = top
    digit = c.isdigit() and c.isascii()
    if phase == "begin":
        if c == "-":
            return [rest + (("num", integer, "sign", 0),)]
        phase = "sign"
    if phase == "sign":
        return [rest + (("num", integer, "zero" if c == "0" else "int", 1),)] if digit else []
    if phase == "int" and digit and digits < MAX_DIGITS:
        return [rest + (("num", integer, "int", digits + 1),)]
    if phase in ("zero", "int") and c == "." and not integer:
        return [rest + (("num", integer, "dot", digits),)]
    if phase in ("dot", "frac") and digit and digits < MAX_DIGITS:
        return [rest + (("num", integer, "frac", digits + 1),)]
    if phase in ("zero", "int", "frac"):  # the number ended: c belongs to what follows it
        return _feed(_done(rest), c) if rest else []
    return []


def _feed_object(top: tuple, rest: tuple, c: str) -> list[tuple]:
    _, node, phase, seen, key = top
    props, required = node[1], node[2]
    if phase in ("start", "after") and c == "}" and (props is None or required <= seen):
        return [_done(rest)]
    if phase == "after" and c == "," and (props is None or any(k not in seen for k, _ in props)):
        return [rest + (("obj", node, "next", seen, None),)]
    if phase in ("start", "next") and c == '"':
        here = rest + (("obj", node, "key", seen, None),)
        if props is None:  # any object: any key
            return [here + (("str", 0, MAX_STRING, 0, False, "key"),)]
        keys = tuple(json.dumps(k) for k, _ in props if k not in seen)
        return _feed(here + (("lit", keys, 0, "key"),), c) if keys else []
    if phase == "colon" and c == ":":
        value = ANY if props is None else dict(props)[key]
        seen = seen if props is None else seen | {key}
        return [rest + (("obj", node, "value", seen, key), ("val", value))]
    return []


def _advance(states: tuple, text: str) -> tuple:
    for c in text:
        states = tuple(dict.fromkeys(s for stack in states for s in _feed(stack, c)))
        if not states:
            break
    return states


def _accepting(stack: tuple) -> bool:
    return not stack or (len(stack) == 1 and stack[0][0] == "num" and stack[0][2] in ("zero", "int", "frac"))


# ---- the vocabulary side -----------------------------------------------------------------------------------
class _Vocab:
    """Token strings of a tokenizer in two tries (all, and those with a quote/backslash/control character),
    and the "plain" tokens with their lengths."""

    def __init__(self, tokenizer: Any) -> None:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.texts: dict[int, str] = {}
        size = len(tokenizer)
        for i in range(size):
            if i not in special:
                text = tokenizer.decode([i])
                if text:
                    self.texts[i] = text
        self.trie: dict = {}
        self.special_trie: dict = {}
        plain_ids, plain_lengths = [], []
        for i, text in self.texts.items():
            _insert(self.trie, text, i)
            if any(ch in '"\\' or ord(ch) < 0x20 for ch in text):
                _insert(self.special_trie, text, i)
            else:
                plain_ids.append(i)
                plain_lengths.append(len(text))
        self.plain_ids, self.plain_lengths = torch.tensor(plain_ids, dtype=torch.long), torch.tensor(plain_lengths)


def _insert(trie: dict, text: str, token: int) -> None:
    node = trie
    for ch in text:
        node = node.setdefault(ch, {})
    node.setdefault(None, []).append(token)


_VOCABS: dict[int, _Vocab] = {}


class JsonConstraint:
    """The tokens that may follow a request's generated tokens (SamplingParams.constraint)."""

    def __init__(self, node: tuple, tokenizer: Any, eos_ids: set[int]) -> None:
        if id(tokenizer) not in _VOCABS:
            _VOCABS[id(tokenizer)] = _Vocab(tokenizer)
        self.vocab, self.eos = _VOCABS[id(tokenizer)], sorted(eos_ids)
        self.initial = ((("val", node),),)
        self._states: OrderedDict[tuple, tuple] = OrderedDict()  # generated ids -> states, the latest few

    def states(self, history: list[int]) -> tuple:
        key = tuple(history)
        if key in self._states:
            return self._states[key]
        states = self.initial if not history else _advance(self.states(history[:-1]), self.vocab.texts.get(history[-1], "\0"))
        self._states[key] = states
        while len(self._states) > 512:
            self._states.popitem(last=False)
        return states

    def allowed(self, history: list[int]) -> torch.Tensor:
        states = self.states(history)
        ids: list[int] = list(self.eos) if any(_accepting(s) for s in states) else []
        in_string = len(states) == 1 and states[0] and states[0][-1][0] == "str" and not states[0][-1][4]
        if in_string:
            _, _, most, count, _, _ = states[0][-1]
            room = most - count
            plain = self.vocab.plain_ids[self.vocab.plain_lengths <= room]
            _walk(self.vocab.special_trie, states, ids)
            return torch.cat([plain, torch.tensor(ids, dtype=torch.long)])
        _walk(self.vocab.trie, states, ids)
        return torch.tensor(ids if ids else self.eos, dtype=torch.long)


def _walk(trie: dict, states: tuple, out: list[int]) -> None:
    for ch, child in trie.items():
        if ch is None:
            continue
        after = _advance(states, ch)
        if after:
            out.extend(child.get(None, ()))
            _walk(child, after, out)


def json_constraint(response_format: dict, tokenizer: Any, eos_ids: set[int]) -> JsonConstraint:
    """The constraint of an OpenAI `response_format` (json_object, or json_schema with its `schema`)."""
    if tokenizer is None:
        raise RequestError("response_format needs the server's tokenizer", param="response_format")
    if response_format["type"] == "json_object":
        return JsonConstraint(ANY_OBJECT, tokenizer, eos_ids)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise RequestError("response_format json_schema needs {\"name\": ..., \"schema\": {...}}", param="response_format")
    return JsonConstraint(compile_schema(spec.get("schema", {})), tokenizer, eos_ids)
