"""A chat whose replies come from an OpenAI-compatible server (`chat --endpoint`): the same conversation, history,
tool loop and display as `ChatSession`, with generation by `lfm2cli.runs.remote.RemoteRun`.

There is no local model, tokenizer or cache here. The server renders the messages with its own template and
keeps its own prefix cache (vLLM's prefix caching, SGLang's radix tree), so the methods that count or rewind
cached tokens do nothing, and the context limit is the server's to enforce. Replies go back to the server as
OpenAI clients send them: the answer as content, tool calls as `tool_calls`, the reasoning left out."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lfm2cli.chat.session import ChatMessage, ChatSession, TurnResult
from lfm2cli.decoding.sampling import SamplingParams
from lfm2cli.errors import UsageError
from lfm2cli.reply.thinking import Reasoning
from lfm2cli.runs.remote import Endpoint, RemoteRun
from lfm2cli.store.conversations import HistoryStore


class RemoteChatSession(ChatSession):
    """`ChatSession` over an endpoint. `response_format` constrains every reply; `tool_choice` (required or a
    name) only the first reply after a user message, as locally."""

    def __init__(self, endpoint: Endpoint, store: HistoryStore, model_name: str,
                 params: SamplingParams | None = None, max_tokens: int = 1024, system: str | None = None,
                 tools: list[dict[str, Any]] | None = None, response_format: dict[str, Any] | None = None,
                 tool_choice: str = "auto", grammar: Any = None) -> None:
        # Not ChatSession.__init__: there is no model, tokenizer or cache here. `grammar` only tells the display
        # that answers are JSON; the server enforces response_format.
        self.endpoint = endpoint
        self.lm = None
        self.response_format = response_format
        self.tool_choice = tool_choice
        self._conversation_state(store, model_name, params, max_tokens, system, tools, grammar)

    @property
    def context_limit(self) -> None:  # type: ignore[override]
        return None  # the server's

    def context_used(self) -> int:
        return 0

    def template_messages(self, messages: Any = None) -> list[dict[str, Any]]:
        msgs = self.messages if messages is None else messages
        out: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        for m in msgs:
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            d.update({k: v for k in ("tool_calls", "tool_call_id", "name") if (v := getattr(m, k)) is not None})
            out.append(d)
        return out

    def send(self, text: str, on_piece: Callable[[str], None] | None = None) -> TurnResult:
        if not text.strip():
            raise UsageError("the message is empty")
        conv_id = self._ensure_conversation()
        user = ChatMessage("user", text)
        user.id = self.store.add_message(conv_id, "user", text)
        self.messages.append(user)
        return self._remote_reply(on_piece, self.tool_choice)

    def _continue(self, on_piece: Callable[[str], None] | None) -> TurnResult:
        return self._remote_reply(on_piece, self.tool_choice if self.messages[-1].role == "user" else "auto")

    def undo(self) -> int:
        users = [i for i, m in enumerate(self.messages) if m.role == "user"]
        if not users:
            raise UsageError("nothing to undo")
        dropped = len(self.messages) - users[-1]
        self._drop_from(users[-1])
        return dropped

    def _reset_cache(self) -> None:
        pass  # no cache here

    def _remote_reply(self, on_piece: Callable[[str], None] | None, tool_choice: str) -> TurnResult:
        run = RemoteRun(self.endpoint, self.params, self.max_tokens, messages=self.template_messages(),
                        tools=self.tools, tool_choice=tool_choice if self.tools is not None else "auto",
                        response_format=self.response_format)
        reply = self._placeholder()
        t0 = time.perf_counter()
        try:
            for piece in run.pieces():
                self._take(reply, run, "")
                if isinstance(piece, Reasoning):
                    self.thought_tokens = run.generated
                if on_piece is not None:
                    on_piece(piece)
        except BaseException as e:
            run.stats.finish_reason = "interrupted" if isinstance(e, KeyboardInterrupt) else "error"
            self._finish(reply, run, "", run.stats.prompt_tokens, time.perf_counter() - t0)
            if isinstance(e, KeyboardInterrupt):
                return self._result(run, reply, run.stats.prompt_tokens, None)
            raise
        self._finish(reply, run, "", run.stats.prompt_tokens, time.perf_counter() - t0)
        # the server enforces response_format: no grammar of ours to name as cut
        return self._result(run, reply, run.stats.prompt_tokens, None)
