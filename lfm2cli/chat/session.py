"""The chat session: conversation state, the model's cache kept across turns, and the history store.

No terminal code here: the caller hands in a callback for the streamed text and shows what comes back.

The conversation is never re-read. The cache (a `PrefixCache`, as `lfm2 serve` keeps) holds `cached_ids`;
each turn renders the whole conversation with the model's template and feeds only the ids past the longest
common prefix with `cached_ids`. The two can diverge: a sampled reply need not be the canonical encoding
of its own text, and some templates rewrite past turns (LFM2.5 drops old `<think>` blocks). Then the cache
goes back to the latest snapshot at or below the divergence. Snapshots are cheap (conv states only) and
are taken at every turn boundary, so `/retry`, `/undo` and interrupted replies never re-prefill either.

Thinking: every reply is split into reasoning and answer (`TextRun(think=True)`). The answer is the message's
`content`, the reasoning is kept apart, and the template gets back the reply exactly as the model wrote it
(`raw_content`: the `<think>` block, its markers and whitespace included, and the `<think>` a generation
prompt wrote): that is what LFM2.5's template expects, and it keeps the last reply's tokens as they were
generated, so the next turn prefills only its new tokens. The template itself drops old blocks, unless told
`keep_past_thinking`.

Tools: with `tools` (OpenAI function schemas) every prompt lists them and every reply is read for tool calls. A
reply that calls tools is stored with its `tool_calls` (OpenAI's shape, with ids) and its raw text (the call
block, which is what LFM2's templates replay); `add_tool_result` stores each result as a `tool` message, and
`follow_up` generates the reply to them. Running the calls and asking the user is the caller's business.
`call_grammar` (a forced tool call) constrains only the first reply after a user message; `grammar` (JSON)
constrains every other reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm2cli.decoding.constraints import Grammar
from lfm2cli.decoding.loop import GenerationStats
from lfm2cli.decoding.prefix_cache import CachedReply, PrefixCache, common_prefix
from lfm2cli.decoding.sampling import SETTINGS, SamplingParams, parse_setting, validate_setting
from lfm2cli.errors import GenerationError, Lfm2Error, PromptTooLongError, UsageError
from lfm2cli.loading.loader import LoadedModel
from lfm2cli.reply.thinking import OPEN, Reasoning
from lfm2cli.reply.toolcalls import ToolCall, format_calls
from lfm2cli.runs.base import Run
from lfm2cli.runs.local import TextRun
from lfm2cli.runs.prompt import Prompt, encode_prompt, require_tokenizer
from lfm2cli.store.conversations import Conversation, HistoryStore, to_json, to_markdown

SAVE_INTERVAL_S = 0.3  # how often a streaming reply is written to the store
NEAR_FULL = 0.9  # warn once the conversation fills this share of the context


class ContextFullError(GenerationError):
    """The next message does not fit in the model's context."""


@dataclass
class ChatMessage:
    role: str
    content: str  # for a reply: the answer alone
    id: int | None = None  # its row in the history store
    finish_reason: str | None = None
    reasoning: str | None = None  # the `<think>` block's text, without markers (None: no block)
    raw_content: str | None = None  # the reply as the model wrote it, when that is not `content`
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def template_content(self) -> str:
        """What the template gets as this message's content: the reply as written, block included. A reply
        saved without its raw text (a killed process) gets the block back in LFM2.5's layout."""
        if self.raw_content is not None:
            return self.raw_content
        text = self.content
        if self.tool_calls:
            # calls saved without their text (by another client): LFM2's block, as the model writes it
            text += _call_block(self.tool_calls)
        if self.reasoning:
            return f"{OPEN}\n{self.reasoning}\n</think>\n\n{text}"
        return text


@dataclass
class TurnResult:
    text: str
    stats: GenerationStats
    prefilled: int  # prompt tokens run through the model for this reply
    reasoning: str = ""
    thought_tokens: int = 0  # generated tokens spent before the answer started (in the reasoning)
    tool_calls: list[tuple[str, ToolCall]] = field(default_factory=list)  # (call id, call), in order
    tool_errors: list[str] = field(default_factory=list)  # why blocks that looked like calls did not parse
    incomplete: str | None = None  # the grammar's label when its output was cut before it was complete

    @property
    def interrupted(self) -> bool:
        return self.stats.finish_reason == "interrupted"


@dataclass
class SessionTotals:
    replies: int = 0
    prefilled: int = 0
    generated: int = 0
    seconds: float = 0.0


def _timings(stats: GenerationStats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "ttft_s": round(stats.ttft_s, 4),
            "prefill_s": round(stats.prefill_s, 4), "decode_s": round(stats.decode_s, 4),
            "prefill_tps": round(stats.prefill_tps, 2), "decode_tps": round(stats.decode_tps, 2)}


class ChatSession:
    """One chat with one loaded model. Messages are saved to `store` as they are written; the
    conversation row is created with the first message."""

    def __init__(self, lm: LoadedModel, store: HistoryStore, model_name: str,
                 params: SamplingParams | None = None, max_tokens: int = 1024, system: str | None = None,
                 keep_thinking: bool | None = None, tools: list[dict[str, Any]] | None = None,
                 grammar: Grammar | None = None, call_grammar: Grammar | None = None,
                 think_budget: int | None = None) -> None:
        self.lm = lm
        self.tokenizer = require_tokenizer(lm)
        self.prefix = PrefixCache(lm.model.new_cache())
        # None: the template's own default (LFM2.5 drops the blocks of all but the last reply)
        self.template_kwargs: dict[str, Any] = {} if keep_thinking is None else {"keep_past_thinking": keep_thinking}
        self.call_grammar = call_grammar  # the first reply after a user message (--tool-choice required|NAME)
        self.think_budget = think_budget
        self._conversation_state(store, model_name, params, max_tokens, system, tools, grammar)

    def _conversation_state(self, store: HistoryStore, model_name: str, params: SamplingParams | None,
                            max_tokens: int, system: str | None, tools: list[dict[str, Any]] | None,
                            grammar: Grammar | None) -> None:
        """What every chat has, whoever generates its replies (here, or a server: RemoteChatSession)."""
        self.store = store
        self.model_name = model_name
        self.params = params or SamplingParams()
        self.max_tokens = max_tokens
        self.system = system or None
        self.tools = tools  # listed for the model on every turn; None: no tools, calls are not looked for
        self.grammar = grammar  # every reply (JSON for --schema / --format json)
        self.conversation_id: str | None = None
        self.messages: list[ChatMessage] = []
        self.last_prefill_tokens = 0
        self.last_stats: GenerationStats | None = None
        self.thought_tokens = 0  # of the reply streaming now (or the last one): tokens before its answer
        self.totals = SessionTotals()
        self.on_notice: Callable[[str], None] = lambda text: None  # warnings shown before a reply

    @property
    def cache(self) -> Any:
        return self.prefix.cache

    @property
    def cached_ids(self) -> list[int]:
        """The ids the cache holds."""
        return self.prefix.ids

    # ------------------------------------------------------------------ settings

    @property
    def context_limit(self) -> int:
        return self.cache.max_len

    def options(self) -> dict[str, Any]:
        """What is saved with the conversation: the sampling settings and max_tokens."""
        return {**self.params.to_dict(), "max_tokens": self.max_tokens}

    def set_option(self, name: str, value: str) -> None:
        """`/set NAME VALUE`: parse, validate, apply and save with the conversation."""
        key = name.strip().lower().replace("-", "_")
        parsed = parse_setting(key, value)  # the same rules as the command-line options
        if key == "max_tokens":
            self.max_tokens = parsed
        else:
            self.params = SamplingParams.from_dict({**self.params.to_dict(), key: parsed})
        self._save_settings(options=self.options())

    def apply_options(self, options: dict[str, Any]) -> list[str]:
        """Settings saved with a conversation. Unknown keys are ignored; a value that breaks the rules (saved by
        an older lfm2, or edited) is skipped, so it cannot fail every later turn. Returns what was skipped."""
        skipped = []
        for key, value in options.items():
            if key not in SETTINGS:
                continue
            try:
                value = validate_setting(key, value)
            except UsageError as e:
                skipped.append(str(e))
                continue
            if key == "max_tokens":
                self.max_tokens = value
            else:
                self.params = SamplingParams.from_dict({**self.params.to_dict(), key: value})
        return skipped

    def set_system(self, text: str | None) -> None:
        """A new system prompt changes the first tokens of the conversation: the cache starts over. One that
        alone fills the context is refused (ContextFullError), and the old one stays."""
        if text and text != self.system:
            self._check_system(text)
        if (text or None) != self.system:
            self.system = text or None
            self._reset_cache()
        # "" rather than None: the store reads None as "leave unchanged"
        self._save_settings(system=self.system or "")

    def _check_system(self, text: str) -> None:
        """The system prompt with the template and tools, and no message yet, must leave room in the context:
        otherwise every turn after it would fail."""
        if not hasattr(self, "tokenizer"):  # generated elsewhere (RemoteChatSession): that server decides
            return
        limit, saved = self.context_limit, self.system
        self.system = text
        try:
            needed = len(self.prompt_ids([], add_generation_prompt=True))
        except PromptTooLongError:
            needed = None
        finally:
            self.system = saved
        if needed is None or needed >= limit:
            need = f"more than {limit:,}" if needed is None else f"{needed:,}"
            raise ContextFullError(f"this system prompt does not fit: alone it needs {need} tokens and the model's "
                                   f"context holds {limit:,}; shorten it (the system prompt is unchanged)")

    def _save_settings(self, **changes: Any) -> None:
        if self.conversation_id is not None:
            self.store.update_conversation(self.conversation_id, **changes)

    # ------------------------------------------------------------------ conversations

    def new_conversation(self) -> None:
        """Start afresh (settings and system prompt stay); the row is created with the first message."""
        self.conversation_id = None
        self.messages = []
        self._reset_cache()

    def load(self, conv_id: str) -> Conversation:
        """Switch to a saved conversation (id or unique prefix), with its system prompt and settings.
        It is continued with this session's model, which becomes the conversation's model."""
        conv = self.store.get(conv_id)
        self.conversation_id = conv.id
        self.messages = [ChatMessage(m.role, m.content, m.id, m.finish_reason, m.reasoning, m.raw_content,
                                     m.tool_calls, m.tool_call_id, m.name) for m in conv.messages]
        self.system = conv.system or None
        for note in self.store.notes:  # rows the store skipped or read with defaults
            self.on_notice(f"note: {note}")
        self.store.notes.clear()
        skipped = self.apply_options(conv.options)
        if skipped:
            self.on_notice(f"note: ignored a saved setting of conversation {conv.id}: {'; '.join(skipped)}")
        if conv.model != self.model_name:
            self.store.update_conversation(conv.id, model=self.model_name)
        # the cache is kept: whatever prefix the two conversations share is reused by the next turn
        return conv

    def conversation(self) -> Conversation:
        if self.conversation_id is None:
            raise Lfm2Error("nothing saved yet: the conversation starts with your first message")
        return self.store.get(self.conversation_id)

    def export(self, file: str | Path) -> Path:
        """Write the conversation to `file`: JSON for `.json`, Markdown otherwise."""
        from lfm2cli.system.paths import check_output_path

        # the model's own folder is protected too; a remote session (lm None) has none here
        path = check_output_path(file, protect=(self.lm.path,) if self.lm is not None else ())
        conv = self.conversation()
        text = to_json(conv) if path.suffix.lower() == ".json" else to_markdown(conv)
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise Lfm2Error(f"cannot write {path}: {e.strerror or e}") from None
        return path

    def _ensure_conversation(self) -> str:
        if self.conversation_id is None:
            conv = self.store.create_conversation(self.model_name, system=self.system, options=self.options())
            self.conversation_id = conv.id
        return self.conversation_id

    # ------------------------------------------------------------------ prompts and context

    def template_messages(self, messages: Sequence[ChatMessage] | None = None) -> list[dict[str, Any]]:
        msgs = self.messages if messages is None else messages
        head: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        out = []
        for m in msgs:
            d: dict[str, Any] = {"role": m.role, "content": m.template_content()}
            d.update({k: v for k in ("tool_calls", "tool_call_id", "name") if (v := getattr(m, k)) is not None})
            out.append(d)
        return head + out

    def prompt_text(self, messages: Sequence[ChatMessage] | None = None, add_generation_prompt: bool = True
                    ) -> str:
        """The whole conversation as the model sees it (the template decides, e.g. what of past replies)."""
        return self.tokenizer.apply_chat_template(self.template_messages(messages), add_generation_prompt,
                                                  tools=self.tools, **self.template_kwargs)

    def prompt(self, messages: Sequence[ChatMessage] | None = None, add_generation_prompt: bool = True) -> Prompt:
        return encode_prompt(self.tokenizer, self.prompt_text(messages, add_generation_prompt))

    def prompt_ids(self, messages: Sequence[ChatMessage] | None = None, add_generation_prompt: bool = True
                   ) -> list[int]:
        return self.prompt(messages, add_generation_prompt).ids

    def context_used(self) -> int:
        return len(self.prompt_ids(add_generation_prompt=False)) if self.messages or self.system else 0

    def _check_context(self, ids: Sequence[int]) -> None:
        """Refuse a prompt that cannot fit before anything changes; warn when the end is near."""
        limit = self.context_limit
        if len(ids) >= limit:
            raise ContextFullError(
                f"this message does not fit: the conversation would need {len(ids)} tokens and the model's "
                f"context holds {limit}; /new starts a new conversation (or /undo drops the last exchange)"
            )
        room = limit - len(ids)
        if room < self.max_tokens or len(ids) >= NEAR_FULL * limit:
            self.on_notice(f"the conversation uses {len(ids)} of {limit} context tokens; the reply can be at "
                           f"most {min(room, self.max_tokens)} tokens long. /new starts a new conversation")

    # ------------------------------------------------------------------ turns

    def send(self, text: str, on_piece: Callable[[str], None] | None = None) -> TurnResult:
        """Add the user's message and stream the reply. A reply cut by Ctrl-C comes back with finish reason
        "interrupted" (kept, in the conversation and the store); other errors are raised."""
        if not text.strip():
            raise UsageError("the message is empty")
        user = ChatMessage("user", text)
        prompt = self.prompt([*self.messages, user])
        self._check_context(prompt.ids)  # before anything is stored: a refused message leaves no trace
        conv_id = self._ensure_conversation()
        user.id = self.store.add_message(conv_id, "user", text)
        self.messages.append(user)
        return self._reply(prompt, on_piece, self._grammar_after("user"))

    def retry(self, on_piece: Callable[[str], None] | None = None) -> TurnResult:
        """Regenerate the last reply (with the current settings); the old one is deleted. After tool results,
        that is the reply to them."""
        if not self.messages:
            raise UsageError("nothing to retry yet")
        if self.messages[-1].role == "assistant":
            self._drop_from(len(self.messages) - 1)
        if not self.messages or self.messages[-1].role not in ("user", "tool"):
            raise UsageError("nothing to retry: the conversation does not end with your message")
        return self._continue(on_piece)

    def add_tool_result(self, tool_call_id: str, name: str, content: str) -> ChatMessage:
        """Store what a call of the last reply gave (an error result too) as a `tool` message."""
        conv_id = self._ensure_conversation()
        msg = ChatMessage("tool", content, tool_call_id=tool_call_id, name=name)
        msg.id = self.store.add_message(conv_id, "tool", content, tool_call_id=tool_call_id, name=name)
        self.messages.append(msg)
        return msg

    def follow_up(self, on_piece: Callable[[str], None] | None = None) -> TurnResult:
        """The model's reply to the tool results just added. It is never forced to call a tool again (only the
        first reply after a user message is), or a loop of calls could never end."""
        if not self.messages or self.messages[-1].role != "tool":
            raise UsageError("no tool results to answer")
        return self._continue(on_piece)

    def _continue(self, on_piece: Callable[[str], None] | None) -> TurnResult:
        prompt = self.prompt()
        self._check_context(prompt.ids)
        return self._reply(prompt, on_piece, self._grammar_after(self.messages[-1].role))

    def _grammar_after(self, role: str) -> Grammar | None:
        if role == "user" and self.call_grammar is not None:
            return self.call_grammar
        return self.grammar

    def undo(self) -> int:
        """Drop the last exchange (your last message and the reply to it); returns how many messages went."""
        users = [i for i, m in enumerate(self.messages) if m.role == "user"]
        if not users:
            raise UsageError("nothing to undo")
        start = users[-1]
        dropped = len(self.messages) - start
        self._drop_from(start)
        # go back to the snapshot from before that exchange now, so the cache matches the conversation
        ids = self.prompt_ids(add_generation_prompt=False) if self.messages or self.system else []
        self.prefix.rewind(common_prefix(ids, self.cached_ids))
        return dropped

    def _drop_from(self, index: int) -> None:
        """Remove messages[index:] here and in the store."""
        gone = self.messages[index:]
        if self.conversation_id is not None and gone[0].id is not None:
            positions = {m.id: m.position for m in self.store.get(self.conversation_id).messages}
            first = min((positions[m.id] for m in gone if m.id in positions), default=None)
            if first is not None:
                self.store.delete_messages_from(self.conversation_id, first)
        del self.messages[index:]

    def _reply(self, prompt: Prompt, on_piece: Callable[[str], None] | None, grammar: Grammar | None = None
               ) -> TurnResult:
        """Stream a reply to `prompt`, the whole conversation, on the cache kept across turns."""
        cached = CachedReply(self.prefix, prompt.ids)
        reply = self._placeholder()
        # Every reply goes through the reasoning/answer split: one without a leading `<think>` block is all answer.
        run = TextRun(self.lm, cached.last, self.params, self.max_tokens, cache=self.cache, context_ids=prompt.ids,
                      think=True, opened=prompt.opened, tools=self.tools, grammar=grammar,
                      think_budget=self.think_budget)
        prefilled = len(cached.new)
        t0 = time.perf_counter()
        try:
            with cached.generating(run.tokens):
                cached.prefill(self.lm.model)
                pre_s = time.perf_counter() - t0
                self._stream(run, reply, prompt.opened, on_piece)
        except BaseException as e:
            run.stats.finish_reason = "interrupted" if isinstance(e, KeyboardInterrupt) else "error"
            self._finish(reply, run, prompt.opened, prefilled, time.perf_counter() - t0)
            if isinstance(e, KeyboardInterrupt):
                return self._result(run, reply, prefilled, grammar)
            raise
        # stats as if the whole prompt went through the decoding loop: our split prefill belongs to it
        run.stats.ttft_s += pre_s
        run.stats.prefill_s += pre_s
        self._finish(reply, run, prompt.opened, prefilled, time.perf_counter() - t0)
        return self._result(run, reply, prefilled, grammar)

    def _placeholder(self) -> ChatMessage:
        """The reply's message, stored empty first so that a killed process still keeps what was streamed."""
        conv_id = self._ensure_conversation()
        reply = ChatMessage("assistant", "")
        reply.id = self.store.add_message(conv_id, "assistant", "")
        self.messages.append(reply)
        self.thought_tokens = 0
        return reply

    def _stream(self, run: Run, reply: ChatMessage, opened: str, on_piece: Callable[[str], None] | None) -> None:
        """Hand the run's pieces to `on_piece`, keeping the reply's message, its store row (every
        `SAVE_INTERVAL_S`) and the count of reasoning tokens up to date."""
        saved_at = time.perf_counter()
        answering = False
        for piece in run.pieces():
            self._take(reply, run, opened)
            if isinstance(piece, Reasoning):
                if not answering:
                    self.thought_tokens = run.generated
            elif not answering:
                answering = True
                # the token that began the answer is not reasoning
                self.thought_tokens = run.generated - 1 if run.reasoning else 0
            if on_piece is not None:
                on_piece(piece)
            if time.perf_counter() - saved_at >= SAVE_INTERVAL_S:
                self.store.update_message(reply.id, content=run.text, reasoning=reply.reasoning,
                                          raw_content=reply.raw_content)
                saved_at = time.perf_counter()

    def _result(self, run: Run, reply: ChatMessage, prefilled: int, grammar: Grammar | None) -> TurnResult:
        calls = [(entry["id"], call) for entry, call in zip(reply.tool_calls or [], run.tool_calls, strict=True)]
        incomplete = None
        if run.incomplete and run.stats.finish_reason != "interrupted" and grammar is not None:
            incomplete = grammar.label
        return TurnResult(run.text, run.stats, prefilled, run.reasoning, self.thought_tokens, calls,
                          [u.error for u in run.tool_errors], incomplete)

    @staticmethod
    def _take(reply: ChatMessage, run: Run, opened: str) -> None:
        """The reply so far into its message: the answer, the reasoning, and the text the template gets back."""
        reply.content = run.text
        reply.reasoning = run.reasoning or None
        raw = opened + run.raw
        reply.raw_content = raw if raw != run.text else None

    def _finish(self, reply: ChatMessage, run: Run, opened: str, prefilled: int, seconds: float) -> None:
        stats = run.stats
        stats.prompt_tokens = prefilled
        self._take(reply, run, opened)
        if run.reasoning and self.thought_tokens == 0:  # never reached its answer: all of it was reasoning
            self.thought_tokens = run.generated
        reply.finish_reason = stats.finish_reason
        if run.tool_calls:
            # ids made here: each tool message names the call it answers
            reply.tool_calls = [call.to_openai() for call in run.tool_calls]
        self.last_prefill_tokens = prefilled
        self.last_stats = stats
        self.totals.replies += 1
        self.totals.prefilled += prefilled
        self.totals.generated += stats.generated_tokens
        self.totals.seconds += seconds
        assert reply.id is not None
        timings = _timings(stats)
        if reply.reasoning:
            timings["reasoning_tokens"] = self.thought_tokens
        self.store.update_message(reply.id, content=run.text, tokens=stats.generated_tokens, timings=timings,
                                  finish_reason=stats.finish_reason, reasoning=reply.reasoning,
                                  raw_content=reply.raw_content, tool_calls=reply.tool_calls)

    # ------------------------------------------------------------------ the cache

    def _reset_cache(self) -> None:
        self.prefix.reset()


def _call_block(entries: Sequence[dict[str, Any]]) -> str:
    """Stored calls (OpenAI's shape) as LFM2's call block; entries that cannot be read back are left out."""
    calls = []
    for entry in entries:
        try:
            calls.append(ToolCall.from_openai(entry))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return format_calls(calls) if calls else ""
