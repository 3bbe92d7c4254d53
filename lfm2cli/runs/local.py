"""Text in, text out: builds prompts, turns the token stream into text pieces (whole UTF-8 characters,
stop strings held back, reasoning told apart from the answer and tool calls taken out of it on request) and
records why generation stopped. Shared by `generate`, `chat` and `bench`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lfm2cli.decoding.constraints import Constraint, Grammar
from lfm2cli.decoding.loop import GenerationStats, generate
from lfm2cli.decoding.sampling import Sampler, SamplingParams, check_bias_ids
from lfm2cli.errors import CheckpointError, UsageError
from lfm2cli.loading.loader import LoadedModel
from lfm2cli.model.config import parse_json
from lfm2cli.reply.thinking import CLOSE, OPEN, Answer, Reasoning, ThinkingBudget, ThinkingSplitter
from lfm2cli.reply.toolcalls import TOOL_CALL_END, TOOL_CALL_START, Calls, Event, ToolCall, ToolCallStream, Unparsed
from lfm2cli.text.detokenize import StreamingDetokenizer
from lfm2cli.text.stops import StopMatcher


def as_text(data: bytes | str) -> tuple[str, bool]:
    """Text the tokenizer can take from bytes or a str that may hold invalid UTF-8: bad bytes become U+FFFD.
    Returns (text, whether anything was replaced). Python hands undecodable stdin and argv bytes over as lone
    surrogates (surrogateescape), which the tokenizer refuses, so a str is turned back into its bytes first."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
            return data, False
        except UnicodeEncodeError:
            try:
                data = data.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:  # surrogates that did not come from bytes
                data = data.encode("utf-8", "surrogatepass")
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), True


def read_stdin_text(stream: Any = None) -> tuple[str, bool]:
    """All of stdin (or `stream`) as text, invalid UTF-8 replaced: see `as_text`. Reads the bytes underneath when
    there are any, so neither a strict locale decoder nor surrogateescape sees them first."""
    stream = sys.stdin if stream is None else stream
    raw = getattr(stream, "buffer", None)
    return as_text(raw.read() if raw is not None else stream.read())


def replaced_note(sources: Sequence[str]) -> str:
    """The one note a run prints when `as_text` had to replace bytes, naming where they came from."""
    return (f"note: {' and '.join(dict.fromkeys(sources))} held invalid UTF-8; the bad bytes were replaced with "
            "U+FFFD, the replacement character")


def length_stop_note(stats: GenerationStats, max_tokens: int) -> str | None:
    """Why a reply that finished with "length" stopped: the caller's cap or a full context. None otherwise."""
    if stats.finish_reason != "length":
        return None
    if stats.length_limit == "context":
        return f"stopped because the model's context is full ({stats.context_tokens} tokens)"
    return f"stopped at the max_tokens limit ({max_tokens} tokens)"


def require_tokenizer(lm: LoadedModel) -> Any:
    if lm.tokenizer is None:
        raise CheckpointError(f"{lm.path}: no tokenizer.json; the checkpoint needs its tokenizer files")
    return lm.tokenizer


def prompt_text(lm: LoadedModel, prompt: str, system: str | None = None, raw: bool = False,
                tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The text of a one-shot prompt: the model's chat template rendered (with `tools`, the function schemas the
    template lists for the model), or the text as is with `raw`."""
    if raw:
        if tools is not None:
            raise UsageError("tools need the chat template, which lists them for the model; a raw prompt has none")
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return require_tokenizer(lm).apply_chat_template(messages, add_generation_prompt=True,
                                                     tools=None if tools is None else list(tools))


_TOOLS_SHAPE = ('a JSON list of function tools, [{"type": "function", "function": {"name": ..., "parameters": '
                '{...}}}] or [{"name": ..., "parameters": {...}}]')


def check_tools(data: Any) -> list[dict[str, Any]]:
    """`data` as a list of tool schemas (OpenAI `{"type": "function", "function": {...}}` or bare function
    objects), kept as given for the template. Raises ValueError saying what is wrong and what is expected."""
    if not isinstance(data, list):
        raise ValueError(f"expected {_TOOLS_SHAPE}, not a JSON {_json_kind(data)}")
    from lfm2cli.text.chat_template import tools_problem

    problem = tools_problem(data)  # too many or too large for any prompt: said before a template chokes on them
    if problem is not None:
        raise ValueError(problem)
    for n, tool in enumerate(data, 1):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(tool, dict) and "function" in tool and tool.get("type", "function") != "function":
            raise ValueError(f"tool {n} has type {tool.get('type')!r}; only \"function\" tools exist; expected "
                             f"{_TOOLS_SHAPE}")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tool {n} has no function name; expected {_TOOLS_SHAPE}")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ValueError(f"tool {n} ({fn['name']}): parameters must be a JSON schema object; expected "
                             f"{_TOOLS_SHAPE}")
        problem = _parameters_problem(fn)
        if problem:
            raise ValueError(f"tool {n} ({fn['name']}): {problem}; expected {_TOOLS_SHAPE}")
    return data


def _parameters_problem(fn: dict[str, Any]) -> str | None:
    """What is wrong with the parts of a tool the prompt and the call grammar read (None: nothing)."""
    if not isinstance(fn.get("description", ""), str):
        return f"description must be a string, not a JSON {_json_kind(fn['description'])}"
    params = fn.get("parameters") or {}
    props = params.get("properties", {})
    if not isinstance(props, dict):
        return f"parameters.properties must be an object of argument schemas, not a JSON {_json_kind(props)}"
    for name, schema in props.items():
        if not isinstance(schema, dict):
            return f"parameters.properties.{name} must be a JSON schema object, not a JSON {_json_kind(schema)}"
    required = params.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        return "parameters.required must be a list of argument names"
    return None


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value),
                                                                                                "number")


def read_tools(path: str) -> list[dict[str, Any]]:
    """The tool schemas in the JSON file `path` (see `check_tools`); any problem is one UsageError naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"{path}: cannot read the tools file ({e.strerror or e}); expected {_TOOLS_SHAPE}") from None
    try:
        data = parse_json(raw.decode("utf-8"))  # deep nesting and 5,000-digit numbers are ValueErrors too
    except UnicodeDecodeError:
        raise UsageError(f"{path}: the tools file is not UTF-8 text; expected {_TOOLS_SHAPE}") from None
    except ValueError as e:
        raise UsageError(f"{path}: not valid JSON ({e}); expected {_TOOLS_SHAPE}") from None
    try:
        return check_tools(data)
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None


def encode_prompt(lm: LoadedModel, text: str, raw: bool = False) -> list[int]:
    """Token ids for `prompt_text`'s result: a raw prompt gets BOS, a rendered template already begins with it."""
    return require_tokenizer(lm).encode(text, add_special_tokens=raw)


def prompt_ids(lm: LoadedModel, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids for a one-shot prompt: the model's chat template, or the text as is with `raw`."""
    return encode_prompt(lm, prompt_text(lm, prompt, system, raw), raw)


def thinking_markers(tokenizer: Any) -> dict[int, str]:
    """Ids of `<think>`/`</think>` where the tokenizer has them as special tokens (which decoding skips)."""
    special = getattr(tokenizer, "special_tokens", {})
    return {special[m]: m for m in (OPEN, CLOSE) if m in special}


def tool_markers(tokenizer: Any) -> dict[int, str]:
    """Ids of `<|tool_call_start|>`/`<|tool_call_end|>` where the tokenizer has them as special tokens (as LFM2's
    does), so the detokenizer keeps them for the tool-call parser."""
    special = getattr(tokenizer, "special_tokens", {})
    return {special[m]: m for m in (TOOL_CALL_START, TOOL_CALL_END) if m in special}


def stop_ids(lm: LoadedModel) -> set[int]:
    """The checkpoint's EOS ids plus the tokenizer's EOS (`<|im_end|>` ends a chat turn)."""
    ids = set(lm.config.eos_token_ids)
    if lm.tokenizer is not None and lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return ids


@dataclass
class TextRun:
    """One streamed generation: iterate `pieces()` for text; `text`, `tokens` and `stats` fill in.

    With `think`, a leading `<think>` block is split off (`opened`: the prompt already opened it): `pieces()`
    yields `Reasoning` and `Answer` pieces, `text` holds the answer and `reasoning` the block's text. Stop
    strings apply to the answer only, so a stop string the model happens to think about does not end the reply.
    With `tools` (the schemas the prompt listed; `[]` counts), tool-call blocks are taken out of the answer:
    a block that parses is never yielded, its calls go to `tool_calls`, generation stops at its end and
    `stats.finish_reason` becomes "tool_calls"; a block that does not parse is yielded as the text it was and
    kept in `tool_errors`. Without `think` or `tools`, every piece is an `Answer` (a str): the text as before.

    `think_budget` (with `think`) closes the block for the model after that many reasoning tokens. `grammar`
    constrains the answer (never the reasoning): JSON for a schema, or a tool-call block (see structured.py)."""

    lm: LoadedModel
    prompt: Sequence[int]
    params: SamplingParams
    max_tokens: int
    stops: Sequence[str] = ()
    cache: Any = None
    context_ids: Sequence[int] | None = None
    think: bool = False
    opened: bool = False
    tools: Sequence[Mapping[str, Any]] | None = None
    think_budget: int | None = None
    grammar: Grammar | None = None
    # called with the token count after each token is handled, before the model runs the next step: the cache
    # then holds every token but the last, so a caller may snapshot it or raise to stop (lfm2 serve's cancel)
    after_token: Callable[[int], None] | None = None
    drop_cut_call: bool = False  # a call block the length cap cut is left out of `text` (lfm2 serve's replies)
    text: str = ""
    reasoning: str = ""
    raw: str = ""  # every character the detokenizer gave, markers included: the reply as the model wrote it
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_errors: list[Unparsed] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    constraint: Constraint | None = field(default=None, init=False, repr=False)

    def _generate(self, sampler: Any) -> Iterator[int]:
        return generate(self.lm.model, self.prompt, sampler=sampler, max_tokens=self.max_tokens,
                        eos_ids=stop_ids(self.lm), cache=self.cache, context_ids=self.context_ids,
                        stats=self.stats)

    def pieces(self) -> Iterator[Reasoning | Answer]:
        tok = require_tokenizer(self.lm)
        markers = thinking_markers(tok) if self.think else {}
        keep = dict(markers)
        call_markers = tool_markers(tok) if self.tools is not None else {}
        keep |= call_markers
        detok = StreamingDetokenizer(tok, keep=keep)
        # with tools, a call block begun inside an unclosed <think> ends the reasoning: the call is not lost in it
        call_start = TOOL_CALL_START if self.tools is not None else None
        splitter = ThinkingSplitter(opened=self.opened, call_start=call_start) if self.think else None
        ids = {text: i for i, text in markers.items()}
        budget = None
        if self.think and self.think_budget is not None:
            budget = ThinkingBudget(self.think_budget, opened=self.opened, open_id=ids.get(OPEN),
                                    close_id=ids.get(CLOSE), call_start=call_start)
        constraint = None
        eos = sorted(stop_ids(self.lm))
        if self.grammar is not None:
            constraint = Constraint(tok, self.grammar, self.lm.config.vocab_size, eos)
        call_id = next((i for i, m in call_markers.items() if m == TOOL_CALL_START), None)
        check_bias_ids(self.params.logit_bias, self.lm.config.vocab_size)
        history = self.context_ids if self.context_ids is not None else self.prompt
        steer = _Steer(Sampler(self.params, len(history)), tok, splitter, budget, constraint, ids.get(OPEN), eos,
                       call_id)
        self.constraint = constraint
        calls = ToolCallStream(self.tools) if self.tools is not None else None
        matcher = StopMatcher(list(self.stops))
        done = False  # a stop string or a whole tool-call block ended the reply; finish_reason says which

        def split(text: str, final: bool = False) -> list[Reasoning | Answer]:
            self.raw += text
            if splitter is None:
                return [Answer(text)] if text else []
            return splitter.feed(text) + (splitter.close() if final else [])

        def answer(text: str) -> Iterator[Answer]:
            nonlocal done
            out, hit = matcher.feed(text)
            if out:
                self.text += out
                yield Answer(out)
            if hit:
                self.stats.finish_reason = "stop"
                done = True

        def answer_events(events: Iterable[Event]) -> Iterator[Answer]:
            nonlocal done
            for event in events:
                if isinstance(event, Calls):
                    # Text held back as a possible stop string is answer text after all: the reply ends here.
                    out = matcher.flush()
                    if out:
                        self.text += out
                        yield Answer(out)
                    self.tool_calls += event.calls
                    self.stats.finish_reason = "tool_calls"
                    done = True
                    return
                if isinstance(event, Unparsed):
                    self.tool_errors.append(event)
                yield from answer(event.text)
                if done:
                    return

        def sorted_out(pieces: list[Reasoning | Answer]) -> Iterator[Reasoning | Answer]:
            for piece in pieces:
                if isinstance(piece, Reasoning):
                    self.reasoning += piece
                    yield piece
                    continue
                yield from answer(piece) if calls is None else answer_events(calls.feed(piece))
                if done:
                    return

        gen = self._generate(steer)
        try:
            for t in gen:
                self.tokens.append(t)
                text = detok.add(t)
                if budget is not None:
                    budget.observe(t, text)
                yield from sorted_out(split(text))
                if done:
                    return
                if self.after_token is not None:
                    self.after_token(len(self.tokens))
            yield from sorted_out(split(detok.flush(), final=True))
            if calls is not None and not done:
                # A block still open at the end parses if its content is whole (the end marker never came).
                events = calls.close()
                if self.drop_cut_call and self.stats.finish_reason == "length":
                    # cut by the length cap: half a call block is no answer (kept in tool_errors, not in text)
                    self.tool_errors += [e for e in events if isinstance(e, Unparsed)]
                    events = [e for e in events if not isinstance(e, Unparsed)]
                yield from answer_events(events)
            if done:
                return
            out = matcher.flush()
            if out:
                self.text += out
                yield Answer(out)
        except KeyboardInterrupt:
            self.stats.finish_reason = "interrupted"
            raise
        finally:
            gen.close()

    def run(self) -> str:
        for _ in self.pieces():
            pass
        return self.text

    @property
    def incomplete(self) -> bool:
        """A grammar was given and its text never completed (the reply was cut first)."""
        return self.constraint is not None and not self.constraint.done


class _Steer:
    """The sampler a TextRun hands to the generation loop: it closes the `<think>` block when the budget is spent
    (feeding `</think>` itself, token by token) and masks the answer's logits with the grammar. The loop yields
    each token to the TextRun before asking for the next, so the splitter and budget state are current here."""

    def __init__(self, sampler: Sampler, tokenizer: Any, splitter: ThinkingSplitter | None,
                 budget: ThinkingBudget | None, constraint: Constraint | None, open_id: int | None,
                 eos_ids: Sequence[int] = (), call_id: int | None = None) -> None:
        import torch

        self.sampler, self.tokenizer = sampler, tokenizer
        self.splitter, self.budget, self.constraint = splitter, budget, constraint
        self.open_id = open_id
        self.eos = torch.tensor(eos_ids, dtype=torch.long)
        self.forced: list[int] = []
        # `<|tool_call_start|>` written inside the reasoning ends it (ThinkingSplitter): under a grammar that
        # begins with it (a forced call) it is the grammar's first token; under any other it may not be written
        self.call_id = call_id
        self._call_starts_grammar: bool | None = None

    def __call__(self, logits: Any, seen: Any) -> int:
        if self.budget is not None and not self.forced and self.budget.due:
            self.forced = self.tokenizer.encode(self.budget.force_close())
        if self.forced:
            return self.forced.pop(0)
        state = self.splitter.state if self.splitter is not None else "answer"
        if self.constraint is None:
            return self.sampler(logits, seen)
        if state == "reasoning":
            # free text, but no ending here: the answer the grammar promises must still come
            logits = logits.index_fill(0, self.eos, float("-inf"))
            if self.call_id is None:
                return self.sampler(logits, seen)
            if self._call_starts_grammar is None:
                self._call_starts_grammar = bool(self.constraint.allowed()[self.call_id])
            if not self._call_starts_grammar:
                logits[self.call_id] = float("-inf")
            tok = self.sampler(logits, seen)
            if tok == self.call_id:
                self.constraint.accept(tok)
            return tok
        masked = self.constraint.mask(logits)
        if state == "start" and self.open_id is not None:
            masked[self.open_id] = logits[self.open_id]  # a thinking model may still open its block first
        tok = self.sampler(masked, seen)
        if tok != self.open_id or state != "start":
            self.constraint.accept(tok)
        return tok
