"""What a generation run offers the commands that show it (`generate`, `chat`), wherever the model runs: here
(`runs.local.TextRun`) or on a server (`runs.remote.RemoteRun`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lfm2cli.decoding.loop import GenerationStats
    from lfm2cli.reply.thinking import Answer, Reasoning
    from lfm2cli.reply.toolcalls import ToolCall, Unparsed


class Run(Protocol):
    """One streamed reply. Iterate `pieces()` (or call `run()`); the fields fill in as it goes.

    `text`: the answer; `reasoning`: the `<think>` block's text; `raw`: the reply as a conversation's history
    gives it back to the model; `tool_calls`: the calls the answer made (then `stats.finish_reason` is
    "tool_calls"); `tool_errors`: blocks that looked like calls and did not parse (they stay in `text`)."""

    text: str
    reasoning: str
    tool_calls: list[ToolCall]
    tool_errors: list[Unparsed]
    stats: GenerationStats

    def pieces(self) -> Iterator[Reasoning | Answer]: ...

    def run(self) -> str: ...

    @property
    def raw(self) -> str: ...

    @property
    def generated(self) -> int:
        """Tokens generated so far (a server streams about one a chunk: chunks counted)."""
        ...

    @property
    def incomplete(self) -> bool:
        """Output promised to follow a grammar or response format was cut before it was complete."""
        ...
