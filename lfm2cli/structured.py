"""Constrained decoding: output that always parses as JSON (any object, or one that validates against a JSON
schema) and forced tool calls, by masking the logits with llguidance before each token is sampled.

llguidance was chosen over xgrammar by measurement (benchmarks/grammar.py, docs/performance.md): it builds its
token tables straight from a `tokenizers` JSON, compiles a schema in milliseconds with no ahead-of-time step,
and computes a 65,536-token mask in tens of microseconds. Free of terminal code, so `serve` can reuse it.
"""

from __future__ import annotations

import json
import keyword
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lfm2cli.errors import UsageError
from lfm2cli.toolcalls import TOOL_CALL_END, TOOL_CALL_START

if TYPE_CHECKING:
    import torch

# JSON as Python's json.dumps writes it (", " and ": "); flexible whitespace lets a sampled model wander into
# endless runs of spaces and newlines, which parse but help nobody.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


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
    `Constraint` compiles it; llguidance refuses what it cannot enforce instead of ignoring it."""
    body = dict(schema if schema is not None else ANY_OBJECT)
    options = {**_JSON_STYLE, **body.get("x-guidance", {})}
    body["x-guidance"] = options
    return _checked(_llguidance().grammar_from("json_schema", json.dumps(body)), label)


def read_schema(value: str) -> dict[str, Any]:
    """`--schema FILE|JSON`: a JSON schema object given inline or in a file. Problems are one UsageError."""
    text, source = value, "--schema"
    path = Path(value).expanduser()
    if path.is_file() or not value.strip().startswith(("{", "[")):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"--schema {value}: no such file, and not inline JSON either (inline schemas start "
                             "with '{')") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: cannot read the schema ({getattr(e, 'strerror', None) or e})") from None
        source = str(path)
    try:
        schema = json.loads(text)
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


def _call_rule(fn: Mapping[str, Any], index: int) -> tuple[str, list[str]]:
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
        return rule, [f"{rule}: %json {json.dumps(call)}"]
    required = [p for p in params.get("required", []) if p in props]
    optional = [p for p in props if p not in required]
    lines: list[str] = []
    parts: list[str] = []
    for n, name in enumerate(required + optional):
        value = f"{rule}_v{n}"
        lines.append(f"{value}: %json {json.dumps({**props[name], 'x-guidance': _JSON_STYLE})}")
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


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool = True) -> Grammar:
    """A tool-call block as LFM2 writes it, `<|tool_call_start|>[f(a=1), g()]<|tool_call_end|>`, calling only the
    listed functions with arguments that fit their schemas (`--tool-choice required`); without `parallel`, exactly
    one call (OpenAI's `parallel_tool_calls: false`)."""
    fns = [t.get("function", t) for t in tools]
    if not fns:
        raise UsageError("--tool-choice required needs at least one tool")
    rules, lines = [], []
    for i, fn in enumerate(fns):
        rule, body = _call_rule(fn, i)
        rules.append(rule)
        lines += body
    more = ' (", " call)*' if parallel else ""
    start = f'start: {TOOL_CALL_START} "[" call{more} "]" {TOOL_CALL_END}'
    grammar = "\n".join([start, "call: " + " | ".join(rules), *lines])
    return _checked(_llguidance().grammar_from("lark", grammar), "--tool-choice")


def choose_grammar(schema: Mapping[str, Any] | None, fmt: str = "text",
                   tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: str = "auto") -> Grammar | None:
    """The grammar for `--schema`, `--format` and `--tool-choice` together; None when nothing is constrained.
    Conflicting requests are one UsageError saying which to drop."""
    if fmt not in ("text", "json"):
        raise UsageError(f"--format {fmt}: expected text or json (for a JSON schema, use --schema)")
    forced = tool_choice != "auto"
    if forced and tools is None:
        raise UsageError(f"--tool-choice {tool_choice} needs --tools (or --functions in chat): there is nothing "
                         "to call")
    if forced and (schema is not None or fmt == "json"):
        raise UsageError(f"--tool-choice {tool_choice} makes the answer a tool call; it cannot also be JSON by "
                         "--schema or --format json: drop one")
    if forced:
        if tool_choice != "required":
            named = [t for t in tools or [] if t.get("function", t).get("name") == tool_choice]
            if not named:
                names = ", ".join(t.get("function", t).get("name") for t in tools or [])
                raise UsageError(f"--tool-choice {tool_choice}: no such tool; expected auto, required or one of: "
                                 f"{names}")
            return tool_call_grammar(named)
        return tool_call_grammar(tools or [])
    if schema is not None:
        return json_grammar(schema, "--schema")
    if fmt == "json":
        return json_grammar(None, "--format json")
    return None


_TOKENIZERS: dict[tuple[int, int, int], Any] = {}  # llguidance's tables take a moment to build for a real vocab


def _lltokenizer(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> Any:
    key = (id(tokenizer), vocab_size, hash(tuple(eos_ids)))
    tok = _TOKENIZERS.get(key)
    if tok is None:
        tok = _llguidance().LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=list(eos_ids))
        _TOKENIZERS.clear()  # one model per process: keep only the latest
        _TOKENIZERS[key] = tok
    return tok


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

    @property
    def done(self) -> bool:
        """The text so far is complete: only an end-of-reply id can follow."""
        return self._matcher.is_stopped() or self._matcher.is_accepting()

    def allowed(self) -> torch.Tensor:
        """A bool tensor over the vocabulary: which ids may come next."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._words * 4)
        return ((self._bits.unsqueeze(1) >> self._shifts) & 1).flatten()[: self.vocab_size].bool()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` with every id the grammar forbids at -inf (a new tensor; the model's is left alone)."""
        return logits.masked_fill(~self.allowed().to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            # the mask allowed it, so this is a bug in the mask or the engine: say so rather than emit bad output
            raise RuntimeError(f"grammar engine refused token {token}: {self._matcher.get_error()}")

