"""Constrained decoding: output that always parses as JSON (any object, or one that validates against a JSON
schema) and forced tool calls, by masking the logits with llguidance before each token is sampled.

llguidance was chosen over xgrammar by measurement (benchmarks/grammar.py, docs/performance.md): it builds its
token tables straight from a `tokenizers` JSON, compiles a schema in milliseconds with no ahead-of-time step,
and computes a 65,536-token mask in tens of microseconds. Free of terminal code, so `serve` can reuse it.
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lfm2cli.errors import UsageError
from lfm2cli.model.config import parse_json
from lfm2cli.reply.toolcalls import TOOL_CALL_END, TOOL_CALL_START, json_depth

if TYPE_CHECKING:
    import torch

# JSON as Python's json.dumps writes it (", " and ": "); flexible whitespace lets a sampled model wander into
# endless runs of spaces and newlines, which parse but help nobody.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Schemas nest a few levels; walking, copying and handing one to llguidance must not exhaust the stack.
MAX_SCHEMA_DEPTH = 128
# JSON's number syntax has no length limit, so a sampled model may write digits until max_tokens, or an exponent
# that makes the value infinite. `Constraint` caps what a number may grow to; these bounds keep every value a
# finite double (at most 1e20 * 1e99).
MAX_INT_DIGITS, MAX_FRAC_DIGITS, MAX_EXP_DIGITS = 20, 20, 2
_NUMBER = re.compile(r"-?(\d*)(?:\.(\d*))?(?:[eE][+-]?(\d*))?")
# Counts that JSON Schema defines as non-negative integers; 2.0 is such an integer, which llguidance refuses.
_COUNTS = frozenset({"maxItems", "minItems", "maxLength", "minLength", "maxProperties", "minProperties",
                     "maxContains", "minContains"})
# What draft 7 and earlier keep beside a `$ref` (they ignore its other siblings; 2019-09 and later apply them).
_REF_KEEPS = frozenset({"$ref", "$schema", "$id", "id", "$comment", "definitions", "$defs", "title", "description",
                        "default", "examples", "x-guidance"})
_OLD_DRAFTS = ("draft-04", "draft-06", "draft-07")


@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's form, and what it is for (named in messages)."""

    text: str
    label: str


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # it is a dependency; a broken install should say how to mend it
        raise UsageError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


def _checked(text: str, label: str) -> Grammar:
    """The grammar, compiled once here so a schema llguidance cannot enforce fails before the model loads."""
    failed, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(text)
    if failed:
        raise UsageError(f"{label}: cannot be enforced ({' '.join(' '.join(messages).split())})")
    return Grammar(text, label)


def json_grammar(schema: Mapping[str, Any] | None = None, label: str = "JSON") -> Grammar:
    """JSON that validates against `schema` (None: any JSON object). The schema is checked when a
    `Constraint` compiles it; llguidance refuses what it cannot enforce instead of ignoring it, and a schema no
    finite value satisfies (`{"$ref": "#"}`) is refused here (see `prepared_schema`)."""
    body = prepared_schema(schema if schema is not None else ANY_OBJECT, label)
    if not isinstance(body, dict):
        raise UsageError(f"{label}: a JSON schema must be an object, like {{\"type\": \"object\", ...}}")
    extra = body.get("x-guidance", {})
    if not isinstance(extra, dict):
        raise UsageError(f"{label}: x-guidance must be an object of llguidance options, like "
                         '{"whitespace_flexible": true}')
    options = {**_JSON_STYLE, **extra}
    body["x-guidance"] = options
    return _checked(_grammar_from("json_schema", json.dumps(body), label), label)


def _grammar_from(kind: str, text: str, label: str) -> str:
    try:
        return _llguidance().grammar_from(kind, text)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{label}: cannot be enforced ({' '.join(str(e).split())[:300]})") from None


def prepared_schema(schema: Any, label: str) -> Any:
    """`schema` as llguidance gets it, or one UsageError: nesting bounded; counts written as 2.0 read as the
    integers JSON Schema says they are; for a draft 4, 6 or 7 `$schema`, the siblings of a `$ref` ignored, as those
    drafts ignore them (llguidance already reads their array `items`, `additionalItems` and boolean
    `exclusiveMaximum`; a keyword it lacks, such as `dependencies`, is refused by name); and a schema no finite
    JSON value satisfies (a `$ref` loop with no way out) refused, as the model could never finish its output."""
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise UsageError(f"{label}: the schema nests more than {MAX_SCHEMA_DEPTH} levels deep; not supported")
    version = schema.get("$schema") if isinstance(schema, Mapping) else None
    if isinstance(version, str) and "draft-03" in version:
        raise UsageError(f"{label}: $schema {version} (draft 3) is not supported; write the schema for draft 7 or "
                         "2020-12")
    old_draft = isinstance(version, str) and any(d in version for d in _OLD_DRAFTS)
    body = _normalised(schema, old_draft)
    where = unsatisfiable(body)
    if where is not None:
        raise UsageError(f"{label}: no finite JSON value satisfies the schema (at {where} it refers back to itself "
                         "with no way to end), so the output could never be complete")
    return body


def _depth(value: Any) -> int:
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_SCHEMA_DEPTH:
            break
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _normalised(schema: Any, old_draft: bool) -> Any:
    """A copy of `schema` (made without recursion, key order kept) with integral float counts as ints and, for
    `old_draft`, only the annotations kept beside each `$ref`."""
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(schema, root, 0)]
    while stack:
        src, parent, key = stack.pop()
        if isinstance(src, Mapping):
            dst: dict[str, Any] = {}
            keep_all = not (old_draft and "$ref" in src)
            for k, v in src.items():
                if not keep_all and k not in _REF_KEEPS:
                    continue
                if k in _COUNTS and isinstance(v, float) and v.is_integer() and v >= 0:
                    v = int(v)
                dst[k] = None  # its place in key order; filled when popped
                stack.append((v, dst, k))
            parent[key] = dst
        elif isinstance(src, (list, tuple)):
            items: list[Any] = [None] * len(src)
            stack.extend((v, items, i) for i, v in enumerate(src))
            parent[key] = items
        else:
            parent[key] = src
    return root[0]


def _pointer(root: Any, ref: str) -> Any:
    """The subschema a local `$ref` ("#", "#/$defs/a") names; None for anything else (llguidance's to judge)."""
    if not ref.startswith("#") or (len(ref) > 1 and not ref.startswith("#/")):
        return None
    from urllib.parse import unquote

    node = root
    for part in ref[2:].split("/") if len(ref) > 1 else ():
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def unsatisfiable(root: Any) -> str | None:
    """Where a schema can produce no finite value: None when every part that must or may be written can end,
    else the JSON pointer of a part that cannot ("#" for the root). A least fixpoint over the subschemas, without
    recursion: a subschema can end once something it may be written as can."""
    nodes: list[tuple[Mapping[str, Any], str]] = []
    stack: list[tuple[Any, str]] = [(root, "#")]
    while stack and len(nodes) < 50_000:
        item, path = stack.pop()
        if isinstance(item, Mapping):
            nodes.append((item, path))
            stack.extend((v, f"{path}/{k}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{path}/{i}") for i, v in enumerate(item))
    good: set[int] = set()

    def ok(sub: Any) -> bool:
        return sub is not False and (not isinstance(sub, Mapping) or id(sub) in good)

    changed = True
    while changed:
        changed = False
        for node, _ in nodes:
            if id(node) not in good and _can_end(node, root, ok):
                good.add(id(node))
                changed = True
    if not ok(root):
        refs = [path for node, path in nodes if not ok(node) and "$ref" in node]
        return min(refs, key=len) if refs else "#"
    # an optional property that cannot end is no better: llguidance lets its key be written, and then nothing
    for node, path in nodes:
        props = node.get("properties")
        for name, sub in props.items() if isinstance(props, Mapping) else ():
            if not ok(sub):
                return f"{path}/properties/{name}"
        extra = node.get("additionalProperties")
        if isinstance(extra, Mapping) and not ok(extra):
            return f"{path}/additionalProperties"
    return None


def _can_end(node: Mapping[str, Any], root: Any, ok: Any) -> bool:
    """Whether `node` has a finite value, given which subschemas `ok` says have one. Only what makes a value
    impossible to finish is judged; whether the keywords agree with each other is llguidance's to say."""
    ref = node.get("$ref")
    if isinstance(ref, str):
        target = _pointer(root, ref)
        if target is not None and not ok(target):
            return False
    every = node.get("allOf")
    if isinstance(every, list) and not all(ok(s) for s in every):
        return False
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and options and not any(ok(s) for s in options):
            return False
    kinds = node.get("type")
    kinds = {kinds} if isinstance(kinds, str) else set(kinds) if isinstance(kinds, list) and all(
        isinstance(k, str) for k in kinds) else None  # a malformed type is llguidance's to refuse, by name
    if kinds is None or kinds - {"object", "array"} or "enum" in node or "const" in node:
        return True  # a scalar, a listed value, or any type (where a scalar will do)
    if "object" in kinds:
        props = node.get("properties") if isinstance(node.get("properties"), Mapping) else {}
        required = node.get("required") if isinstance(node.get("required"), list) else []
        if all(ok(props.get(name, True)) for name in required if isinstance(name, str)):
            return True
    if "array" in kinds:
        least = node.get("minItems", 0)
        least = least if isinstance(least, int) else 0
        items = node.get("items", True)
        prefix = node.get("prefixItems", items if isinstance(items, list) else [])
        rest = node.get("additionalItems", True) if isinstance(items, list) else items
        needed = list(prefix[:least]) + ([rest] if least > len(prefix) else [])
        if all(ok(s) for s in needed):
            return True
    return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # inline JSON longer than a file name can be ("File name too long")
        return False


def read_schema(value: str) -> dict[str, Any]:
    """`--schema FILE|JSON`: a JSON schema object given inline or in a file. Problems are one UsageError."""
    text, source = value, "--schema"
    path = Path(value).expanduser()
    if not value.strip().startswith(("{", "[")) or _is_file(path):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"--schema {value}: no such file, and not inline JSON either (inline schemas start "
                             "with '{')") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: cannot read the schema ({getattr(e, 'strerror', None) or e})") from None
        source = str(path)
    if json_depth(text) > MAX_SCHEMA_DEPTH:
        raise UsageError(f"{source}: the schema nests more than {MAX_SCHEMA_DEPTH} levels deep; not supported")
    try:
        schema = parse_json(text)  # a 5,000-digit number is a ValueError that says so
    except ValueError as e:
        raise UsageError(f"{source}: not valid JSON ({e}); expected a JSON schema object") from None
    if not isinstance(schema, dict):
        raise UsageError(f"{source}: a JSON schema must be an object, like {{\"type\": \"object\", ...}}")
    return schema


def _pythonic(name: str, props: Mapping[str, Any]) -> bool:
    """Whether a call of this tool can be written as LFM2's pythonic call: a (dotted) name and keyword arguments
    that are identifiers, not keywords."""
    return all(part.isidentifier() and not keyword.iskeyword(part) for part in name.split(".")) and all(
        isinstance(p, str) and p.isidentifier() and not keyword.iskeyword(p) for p in props)


def _call_rule(fn: Mapping[str, Any], index: int, label: str) -> tuple[str, list[str]]:
    """Lark rules for one pythonic call `name(a=..., b=...)`: required arguments first in the schema's order,
    then each optional one, in order, if wanted. Every value is JSON for its own schema, which the tool-call
    parser reads (true/false/null included)."""
    params = fn.get("parameters") or {}
    props = params.get("properties") or {}
    rule = f"call{index}"
    if not _pythonic(fn["name"], props):
        # `f(max-results=3)` is no Python call: such a tool is called in the JSON form the parser also reads
        # no arguments beyond the listed ones, as in the pythonic form, unless the schema allows them itself
        args = {"additionalProperties": False, **params, "type": "object"}
        call = {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": args},
                "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": _JSON_STYLE}
        call = prepared_schema(call, f"{label}: tool {fn['name']}")
        return rule, [f"{rule}: %json {json.dumps(call)}"]
    required = [p for p in params.get("required", []) if p in props]
    optional = [p for p in props if p not in required]
    lines: list[str] = []
    parts: list[str] = []
    for n, name in enumerate(required + optional):
        value = f"{rule}_v{n}"
        # each value is its own schema here: "#" in it names the parameter's schema
        schema = prepared_schema({**props[name], "x-guidance": _JSON_STYLE}, f"{label}: {fn['name']}({name}=...)")
        lines.append(f"{value}: %json {json.dumps(schema)}")
        arg = f"{json.dumps(name + '=')} {value}"
        if n > 0:
            arg = f'", " {arg}'
        parts.append(arg if name in required else f"({arg})?")
    if not required and optional:
        # "f(, b=1)" must not happen: without required arguments, whichever optional one comes first takes no comma
        alts = [" ".join([f"{json.dumps(name + '=')} {rule}_v{n}", *parts[n + 1:]]) for n, name in enumerate(optional)]
        args = "(" + " | ".join(alts) + ")?"
    else:
        args = " ".join(parts)
    lines.insert(0, f"{rule}: {json.dumps(fn['name'] + '(')} {args} \")\"")
    return rule, lines


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool = True,
                      label: str = "--tool-choice") -> Grammar:
    """A tool-call block as LFM2 writes it, `<|tool_call_start|>[f(a=1), g()]<|tool_call_end|>`, calling only the
    listed functions with arguments that fit their schemas (`--tool-choice required`); without `parallel`, exactly
    one call (OpenAI's `parallel_tool_calls: false`). `label` names the option in messages."""
    fns = [t.get("function", t) for t in tools]
    if not fns:
        raise UsageError(f"{label} required needs at least one tool")
    rules, lines = [], []
    for i, fn in enumerate(fns):
        rule, body = _call_rule(fn, i, label)
        rules.append(rule)
        lines += body
    more = ' (", " call)*' if parallel else ""
    start = f'start: {TOOL_CALL_START} "[" call{more} "]" {TOOL_CALL_END}'
    grammar = "\n".join([start, "call: " + " | ".join(rules), *lines])
    return _checked(_grammar_from("lark", grammar, label), label)


@dataclass(frozen=True)
class Spelling:
    """How the requests for a grammar are named in its messages: the command line's options (`CLI`) or the fields
    of an OpenAI request (`API`)."""

    schema: str
    json: str
    tool_choice: str
    tools: str
    either_json: str  # both ways to ask for JSON, for the message that refuses them with a forced call


CLI = Spelling("--schema", "--format json", "--tool-choice", "--tools (or --functions in chat)",
               "--schema or --format json")
API = Spelling("response_format", "response_format", "tool_choice", "tools", "response_format")


def choose_grammar(schema: Mapping[str, Any] | None, fmt: str = "text",
                   tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: str = "auto",
                   parallel: bool = True, names: Spelling = CLI) -> Grammar | None:
    """The grammar for a JSON schema, a JSON format (`fmt` "json") and a tool choice together; None when nothing is
    constrained. `parallel`: a forced call may be several calls. Conflicting requests are one UsageError saying
    which to drop, naming them as `names` spells them."""
    if fmt not in ("text", "json"):
        raise UsageError(f"--format {fmt}: expected text or json (for a JSON schema, use --schema)")
    forced = tool_choice != "auto"
    if forced and tools is None:
        raise UsageError(f"{names.tool_choice} {tool_choice} needs {names.tools}: there is nothing to call")
    if forced and (schema is not None or fmt == "json"):
        raise UsageError(f"{names.tool_choice} {tool_choice} makes the answer a tool call; it cannot also be JSON "
                         f"by {names.either_json}: drop one")
    if forced:
        if tool_choice != "required":
            named = [t for t in tools or [] if t.get("function", t).get("name") == tool_choice]
            if not named:
                listed = ", ".join(t.get("function", t).get("name") for t in tools or [])
                raise UsageError(f"{names.tool_choice} {tool_choice}: no such tool; expected auto, required or one "
                                 f"of: {listed}")
            return tool_call_grammar(named, parallel, names.tool_choice)
        return tool_call_grammar(tools or [], parallel, names.tool_choice)
    if schema is not None:
        return json_grammar(schema, names.schema)
    if fmt == "json":
        return json_grammar(None, names.json)
    return None


_TOKENIZERS: dict[tuple[int, int, int], Any] = {}  # llguidance's tables take a moment to build for a real vocab


def _lltokenizer(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> Any:
    key = (id(tokenizer), vocab_size, hash(tuple(eos_ids)))
    tok = _TOKENIZERS.get(key)
    if tok is None:
        tok = _llguidance().LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=list(eos_ids))
        _TOKENIZERS.clear()  # one model per process: keep only the latest
        _NUMBER_TOKENS.clear()
        _TOKENIZERS[key] = tok
    return tok


_NUMBER_TOKENS: dict[int, tuple[Any, list[str]]] = {}
_NUMBER_CHARS = "0123456789.eE+-"


def _number_tokens(lltok: Any, vocab_size: int) -> tuple[Any, list[str]]:
    """The ids whose text begins with a character that can continue a JSON number, and those characters (the
    part of the token a number would take): the only tokens `_Numbers` ever has to look at."""
    import torch

    found = _NUMBER_TOKENS.get(id(lltok))
    if found is None:
        ids, heads = [], []
        for i in range(vocab_size):
            text = lltok.decode_bytes([i])[:64].decode("latin-1")
            if text and text[0] in _NUMBER_CHARS:
                ids.append(i)
                heads.append(text[:len(text) - len(text.lstrip(_NUMBER_CHARS))])
        found = (torch.tensor(ids, dtype=torch.long), heads)
        _NUMBER_TOKENS[id(lltok)] = found
    return found


def number_fits(text: str) -> bool:
    """Whether a number written so far stays within the bounds (`MAX_INT_DIGITS` ...): finite, bounded length."""
    m = _NUMBER.fullmatch(text)
    if m is None:
        return True  # not a number's text: the grammar decides what it is
    whole, frac, exp = m.groups()
    return (len(whole) <= MAX_INT_DIGITS and len(frac or "") <= MAX_FRAC_DIGITS
            and len(exp or "") <= MAX_EXP_DIGITS)


class _Numbers:
    """Follows the constrained text as it is accepted: inside a JSON string or not, and the number being written
    (`run`), so that `Constraint.mask` can stop a number at its bounds."""

    def __init__(self) -> None:
        self.in_string = self.escaped = False
        self.run = ""
        self.prev = " "  # what came before the output: nothing a number could continue

    def feed(self, text: str) -> None:
        for ch in text:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string, self.run = True, ""
            elif self.run:
                self.run = self.run + ch if ch in _NUMBER_CHARS and len(self.run) < 64 else ""
            elif ch in "-0123456789" and not (self.prev.isalnum() or self.prev in "_."):
                self.run = ch  # a digit after a letter is part of a name (`call1(`), not a number
            self.prev = ch


class Constraint:
    """One reply's grammar state: `mask(logits)` before sampling, `accept(token)` after.

    `eos_ids` are the ids that end the reply: the grammar allows them once its text is complete, and only them."""

    def __init__(self, tokenizer: Any, grammar: Grammar, vocab_size: int, eos_ids: Sequence[int]) -> None:
        import torch

        lg = _llguidance()
        self.grammar = grammar
        self.vocab_size = vocab_size
        self._matcher = lg.LLMatcher(_lltokenizer(tokenizer, vocab_size, eos_ids), grammar.text)
        if self._matcher.is_error():
            raise UsageError(f"{grammar.label}: cannot be enforced ({' '.join(self._matcher.get_error().split())})")
        self._words = (vocab_size + 31) // 32
        self._bits = torch.empty(self._words, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)
        self._lltok = _lltokenizer(tokenizer, vocab_size, eos_ids)
        self._numbers = _Numbers()

    @property
    def done(self) -> bool:
        """The text so far is complete: only an end-of-reply id can follow."""
        return self._matcher.is_stopped() or self._matcher.is_accepting()

    def allowed(self) -> torch.Tensor:
        """A bool tensor over the vocabulary: which ids may come next. Within a number, the ids that would take it
        past its bounds are left out, unless the grammar allows nothing else."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._words * 4)
        allowed = ((self._bits.unsqueeze(1) >> self._shifts) & 1).flatten()[: self.vocab_size].bool()
        run = self._numbers.run
        if len(run) >= min(MAX_INT_DIGITS, MAX_FRAC_DIGITS) // 2 or "e" in run or "E" in run:
            allowed = self._bound_number(allowed, run)
        return allowed

    def _bound_number(self, allowed: torch.Tensor, run: str) -> torch.Tensor:
        ids, heads = _number_tokens(self._lltok, self.vocab_size)
        if not len(ids):
            return allowed
        candidates = allowed[ids].nonzero().flatten().tolist()
        over = [i for i in candidates if not number_fits(run + heads[i])]
        if not over:
            return allowed
        bounded = allowed.clone()
        bounded[ids[over]] = False  # one gather, not a tensor index per id
        return bounded if bool(bounded.any()) else allowed  # the grammar itself wants more digits: let it

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` with every id the grammar forbids at -inf (a new tensor; the model's is left alone)."""
        return logits.masked_fill(~self.allowed().to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            # the mask allowed it, so this is a bug in the mask or the engine: say so rather than emit bad output
            raise RuntimeError(f"grammar engine refused token {token}: {self._matcher.get_error()}")
        self._numbers.feed(self._lltok.decode_bytes([int(token)]).decode("utf-8", "replace"))

