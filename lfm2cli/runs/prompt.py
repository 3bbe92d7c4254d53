"""Prompts as the model gets them: a one-shot prompt rendered with the chat template, any prompt text turned into
token ids (the one place that is done, for `generate`, `chat` and `serve` alike), and the ids of the markers and
end tokens a run watches for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lfm2cli.errors import CheckpointError, PromptTooLongError, UsageError
from lfm2cli.reply.thinking import CLOSE, OPEN, opened_block
from lfm2cli.reply.toolcalls import TOOL_CALL_END, TOOL_CALL_START

if TYPE_CHECKING:
    from lfm2cli.loading.loader import LoadedModel


@dataclass(frozen=True)
class Prompt:
    """A prompt's text, its token ids, and `opened`: the `<think>` text it ends with (e.g. "<think>\\n"), which
    the model's reply continues inside the block; "" when the prompt opens no block."""

    text: str
    ids: list[int]
    opened: str = ""


def encode_prompt(tokenizer: Any, text: str, raw: bool = False, within: int | None = None) -> Prompt:
    """`text` as the model gets it. A raw prompt gets BOS; a rendered template already begins with it.
    `within` (a context length): a text that certainly needs that many tokens or more is refused with
    PromptTooLongError after tokenising no more of it than such a context allows for."""
    if within is None:
        ids = tokenizer.encode(text, add_special_tokens=raw)
    else:
        found = tokenizer.encode_within(text, within, raw)
        if found is None:
            raise PromptTooLongError(f"the prompt needs far more tokens than the {within} the context holds; "
                                     "shorten it")
        ids = found
    return Prompt(text, ids, opened_block(text))


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


def one_shot_prompt(lm: LoadedModel, prompt: str, system: str | None = None, raw: bool = False,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> Prompt:
    """A one-shot prompt (see `prompt_text`) with its ids."""
    return encode_prompt(require_tokenizer(lm), prompt_text(lm, prompt, system, raw, tools), raw)


def prompt_ids(lm: LoadedModel, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids for a one-shot prompt: the model's chat template, or the text as is with `raw`."""
    return one_shot_prompt(lm, prompt, system, raw).ids


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
