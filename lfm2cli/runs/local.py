"""A generation run on the model loaded here: the token stream turned into text pieces (whole UTF-8 characters,
stop strings held back, reasoning told apart from the answer and tool calls taken out of it on request), and why
generation stopped. Shared by `generate`, `chat`, `serve` and `bench`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from lfm2cli.decoding.constraints import Constraint, Grammar
from lfm2cli.decoding.loop import GenerationStats, decode_tokens
from lfm2cli.decoding.sampling import Sampler, SamplingParams, TokenLogprob, check_bias_ids
from lfm2cli.decoding.steer import Steer
from lfm2cli.loading.loader import LoadedModel
from lfm2cli.reply.thinking import CLOSE, OPEN, Answer, Reasoning, ThinkingBudget, ThinkingSplitter
from lfm2cli.reply.toolcalls import TOOL_CALL_START, Calls, Event, ToolCall, ToolCallStream, Unparsed
from lfm2cli.runs.prompt import require_tokenizer, stop_ids, thinking_markers, tool_markers
from lfm2cli.text.detokenize import StreamingDetokenizer
from lfm2cli.text.stops import StopMatcher


@dataclass
class TokenScore:
    """A reply token's logprob as the API reports it, with its text and bytes (`token_text`), and the most likely
    tokens at its step (see `decoding.sampling.TokenLogprob`)."""

    text: str
    bytes: bytes
    logprob: float
    top: list[TokenScore] = field(default_factory=list)


@cache
def _byte_values() -> dict[str, int]:
    """GPT-2's byte-level alphabet, which LFM2's tokenizer uses: the printable stand-in of each of the 256 bytes."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + n): b for n, b in enumerate(moved)}


def token_text(tok: Any, token_id: int) -> tuple[str, bytes]:
    """A token's text and its own bytes. A byte-level token holding part of a UTF-8 character has no text of its
    own: it is written `bytes:\\xe2\\x80`, as OpenAI writes such tokens. Special tokens are their text."""
    entry = tok.id_to_token(token_id)
    table = _byte_values()
    if entry is None or entry in tok.special_tokens or not all(c in table for c in entry):
        text = tok.decode([token_id], skip_special_tokens=False)
        return text, text.encode()
    raw = bytes(table[c] for c in entry)
    try:
        return raw.decode(), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


class ScoredAnswer(Answer):
    """An Answer piece with the scores of the tokens its text completes (a TextRun's pieces with `logprobs`)."""

    scores: list[TokenScore]

    def __new__(cls, text: str, scores: list[TokenScore]) -> ScoredAnswer:
        piece = super().__new__(cls, text)
        piece.scores = scores
        return piece


def length_stop_note(stats: GenerationStats, max_tokens: int) -> str | None:
    """Why a reply that finished with "length" stopped: the caller's cap or a full context. None otherwise."""
    if stats.finish_reason != "length":
        return None
    if stats.length_limit == "context":
        return f"stopped because the model's context is full ({stats.context_tokens} tokens)"
    return f"stopped at the max_tokens limit ({max_tokens} tokens)"


@dataclass
class TextRun:
    """One streamed generation on the model loaded here (a `runs.base.Run`): iterate `pieces()` for text; `text`,
    `tokens` and `stats` fill in.

    With `think`, a leading `<think>` block is split off (`opened`: the `<think>` text the prompt ends with, ""
    when it opens none; see `runs.prompt.Prompt`): `pieces()` yields `Reasoning` and `Answer` pieces, `text`
    holds the answer and `reasoning` the block's text. Stop strings apply to the answer only, so a stop string
    the model happens to think about does not end the reply. With `tools` (the schemas the prompt listed; `[]`
    counts), tool-call blocks are taken out of the answer: a block that parses is never yielded, its calls go to
    `tool_calls`, generation stops at its end and `stats.finish_reason` becomes "tool_calls"; a block that does
    not parse is yielded as the text it was and kept in `tool_errors`. Without `think` or `tools`, every piece is
    an `Answer` (a str): the model's text unchanged.

    `think_budget` (with `think`) closes the block for the model after that many reasoning tokens. `grammar`
    constrains the answer (never the reasoning): JSON for a schema, or a tool-call block (see
    decoding/constraints.py).

    `logprobs` (a number of most likely tokens, 0 to 20; None: none computed): each answer piece is a
    `ScoredAnswer` holding the scores of the tokens whose text it is the first to show, and `scores` all of
    them in order. Only the answer's tokens are listed: the reasoning's, a tool-call block's, a stop string's
    and the end-of-sequence token's text is not in the answer."""

    lm: LoadedModel
    prompt: Sequence[int]
    params: SamplingParams
    max_tokens: int
    stops: Sequence[str] = ()
    cache: Any = None
    context_ids: Sequence[int] | None = None
    think: bool = False
    opened: str = ""
    tools: Sequence[Mapping[str, Any]] | None = None
    think_budget: int | None = None
    grammar: Grammar | None = None
    # called with the token count after each token is handled, before the model runs the next step: the cache
    # then holds every token but the last, so a caller may snapshot it or raise to stop (lfm2 serve's cancel)
    after_token: Callable[[int], None] | None = None
    drop_cut_call: bool = False  # a call block the length cap cut is left out of `text` (lfm2 serve's replies)
    logprobs: int | None = None
    text: str = ""
    reasoning: str = ""
    raw: str = ""  # every character the detokenizer gave, markers included: the reply as the model wrote it
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_errors: list[Unparsed] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    constraint: Constraint | None = field(default=None, init=False, repr=False)
    scores: list[TokenScore] = field(default_factory=list)
    _pending: list[TokenScore] = field(default_factory=list, init=False, repr=False)

    @property
    def generated(self) -> int:
        return len(self.tokens)

    @property
    def incomplete(self) -> bool:
        """A grammar was given and its text never completed (the reply was cut first)."""
        return self.constraint is not None and not self.constraint.done

    def run(self) -> str:
        for _ in self.pieces():
            pass
        return self.text

    def pieces(self) -> Iterator[Reasoning | Answer]:
        tok = require_tokenizer(self.lm)
        markers = thinking_markers(tok) if self.think else {}
        call_markers = tool_markers(tok) if self.tools is not None else {}
        detok = StreamingDetokenizer(tok, keep=markers | call_markers)
        # with tools, a call block begun inside an unclosed <think> ends the reasoning: the call is not lost in it
        call_start = TOOL_CALL_START if self.tools is not None else None
        splitter = ThinkingSplitter(opened=bool(self.opened), call_start=call_start) if self.think else None
        budget = self._budget(markers, call_start)
        steer = self._steer(tok, splitter, budget, markers, call_markers)
        sorter = _Sorter(self, splitter, ToolCallStream(self.tools) if self.tools is not None else None)
        gen = decode_tokens(self.lm.model, self.prompt, sampler=steer, max_tokens=self.max_tokens,
                            eos_ids=stop_ids(self.lm), cache=self.cache, context_ids=self.context_ids,
                            stats=self.stats)
        open_id = next((i for i, m in markers.items() if m == OPEN), None)
        try:
            for t in gen:
                self.tokens.append(t)
                if self.logprobs is not None and not (splitter is not None and
                                                      (splitter.state == "reasoning" or t == open_id)):
                    self._pending.append(self._score(tok, steer.scored[-1]))
                text = detok.add(t)
                if budget is not None:
                    budget.observe(t, text)
                yield from sorter.feed(text)
                if sorter.done:
                    return
                if self.after_token is not None:
                    self.after_token(len(self.tokens))
            yield from sorter.feed(detok.flush(), final=True)
            yield from sorter.finish(drop_cut_call=self.drop_cut_call and self.stats.finish_reason == "length")
        except KeyboardInterrupt:
            self.stats.finish_reason = "interrupted"
            raise
        finally:
            gen.close()

    def _budget(self, markers: dict[int, str], call_start: str | None) -> ThinkingBudget | None:
        if not self.think or self.think_budget is None:
            return None
        ids = {text: i for i, text in markers.items()}
        return ThinkingBudget(self.think_budget, opened=bool(self.opened), open_id=ids.get(OPEN),
                              close_id=ids.get(CLOSE), call_start=call_start)

    def _steer(self, tok: Any, splitter: ThinkingSplitter | None, budget: ThinkingBudget | None,
               markers: dict[int, str], call_markers: dict[int, str]) -> Steer:
        """The sampler the decoding loop gets: the settings' draw, the grammar's mask and the budget's close."""
        eos = sorted(stop_ids(self.lm))
        constraint = None
        if self.grammar is not None:
            constraint = Constraint(tok, self.grammar, self.lm.config.vocab_size, eos)
        check_bias_ids(self.params.logit_bias, self.lm.config.vocab_size)
        history = self.context_ids if self.context_ids is not None else self.prompt
        open_id = next((i for i, m in markers.items() if m == OPEN), None)
        call_id = next((i for i, m in call_markers.items() if m == TOOL_CALL_START), None)
        steer = Steer(Sampler(self.params, len(history)), tok, splitter, budget, constraint, open_id, eos, call_id,
                      self.logprobs)
        self.constraint = constraint
        return steer

    @staticmethod
    def _score(tok: Any, scored: TokenLogprob) -> TokenScore:
        return TokenScore(*token_text(tok, scored.id), scored.logprob,
                          [TokenScore(*token_text(tok, i), lp) for i, lp in scored.top])

    def answer_piece(self, text: str) -> Answer:
        """`text` as the next answer piece, with the scores of the tokens still waiting to be shown."""
        self.text += text
        if self.logprobs is None:
            return Answer(text)
        scores, self._pending = self._pending, []
        self.scores += scores
        return ScoredAnswer(text, scores)


class _Sorter:
    """The detokenized text of one TextRun sorted into its reasoning, its answer (stop strings applied) and its
    tool calls. `done`: a stop string or a whole tool-call block ended the reply (finish_reason says which)."""

    def __init__(self, run: TextRun, splitter: ThinkingSplitter | None, calls: ToolCallStream | None) -> None:
        self.run, self.splitter, self.calls = run, splitter, calls
        self.matcher = StopMatcher(list(run.stops))
        self.done = False

    def feed(self, text: str, final: bool = False) -> Iterator[Reasoning | Answer]:
        self.run.raw += text
        if self.splitter is None:
            pieces: list[Reasoning | Answer] = [Answer(text)] if text else []
        else:
            pieces = self.splitter.feed(text) + (self.splitter.close() if final else [])
        for piece in pieces:
            if isinstance(piece, Reasoning):
                self.run.reasoning += piece
                yield piece
                continue
            yield from self._answer(piece) if self.calls is None else self._events(self.calls.feed(piece))
            if self.done:
                return

    def finish(self, drop_cut_call: bool) -> Iterator[Answer]:
        """The end of the stream: a call block still open, then the text held back as a possible stop string."""
        if self.done:
            return
        if self.calls is not None:
            # A block still open at the end parses if its content is whole (the end marker never came).
            events = self.calls.close()
            if drop_cut_call:
                # cut by the length cap: half a call block is no answer (kept in tool_errors, not in text)
                self.run.tool_errors += [e for e in events if isinstance(e, Unparsed)]
                events = [e for e in events if not isinstance(e, Unparsed)]
            yield from self._events(events)
            if self.done:
                return
        yield from self._flush()

    def _answer(self, text: str) -> Iterator[Answer]:
        out, hit = self.matcher.feed(text)
        if out:
            yield self.run.answer_piece(out)
        if hit:
            self.run.stats.finish_reason = "stop"
            self.done = True

    def _events(self, events: Iterable[Event]) -> Iterator[Answer]:
        for event in events:
            if isinstance(event, Calls):
                # Text held back as a possible stop string is answer text after all: the reply ends here.
                yield from self._flush()
                self.run.tool_calls += event.calls
                self.run.stats.finish_reason = "tool_calls"
                self.done = True
                return
            if isinstance(event, Unparsed):
                self.run.tool_errors.append(event)
            yield from self._answer(event.text)
            if self.done:
                return

    def _flush(self) -> Iterator[Answer]:
        out = self.matcher.flush()
        if out:
            yield self.run.answer_piece(out)
