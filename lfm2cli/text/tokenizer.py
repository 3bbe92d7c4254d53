"""The checkpoint's tokenizer (`tokenizer.json` via the `tokenizers` library) plus what
`tokenizer_config.json` says about special tokens and the chat template."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lfm2cli.errors import CheckpointError, ConfigError, GenerationError, PromptTooLongError
from lfm2cli.model.config import parse_json, read_json_object, read_regular
from lfm2cli.text import chat_template as _chat_template
from lfm2cli.text.tokenizer_limits import FILE_LIMIT, check_tokenizer_json, guarded

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_LIMIT = 4 << 20  # bytes of chat_template.jinja; real templates are a few kB
PIECE_CHARS = 1 << 14  # characters tokenised at once when a long text is counted (`Tokenizer.encode_within`)


def token_text(value: Any) -> str | None:
    """Special tokens appear as plain strings or as AddedToken dicts with a `content` key."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(file: Path) -> dict:
    """A tokenizer side file; a missing one is empty."""
    return read_json_object(file) if file.is_file() else {}


def _templates(directory: Path, config: dict) -> dict[str, str]:
    """Named chat templates; a `chat_template.jinja` file wins over the config key, as on the hub."""
    file = directory / TEMPLATE_FILE
    if file.exists():
        try:
            return {"default": read_regular(file, TEMPLATE_LIMIT).decode("utf-8")}
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        except UnicodeDecodeError as e:
            raise CheckpointError(f"cannot read {file}: {' '.join(str(e).split())}") from None
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        return {t["name"]: t["template"] for t in value
                if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
    return {}


class Tokenizer:
    """Encode/decode text and render chats for one checkpoint."""

    template_source: str | None = None  # the file the chat templates came from, named in template errors
    source: str = "tokenizer.json"  # the tokenizer's file, named when the library fails on a text
    max_tokens: int | None = None  # the model's context: a text that needs more is refused before it is encoded

    def __init__(self, backend: Any, *, bos_token: str | None, eos_token: str | None, pad_token: str | None,
                 templates: dict[str, str] | None = None) -> None:
        self._tok = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.templates = dict(templates or {})
        self.bos_token_id = self.token_to_id(bos_token)
        self.eos_token_id = self.token_to_id(eos_token)
        self.pad_token_id = self.token_to_id(pad_token)
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special
        }
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._max_token_chars: int | None = None  # load_tokenizer sets it from the file it checked

    @property
    def max_token_id(self) -> int:
        """The largest id this tokenizer can give (ids may be sparse, so not vocab_size - 1); -1 when empty."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    @property
    def chat_template(self) -> str | None:
        return self.templates.get("default")

    def to_json(self) -> str:
        """The whole tokenizer as `tokenizer.json` text (what grammar engines build their token tables from)."""
        return self._tok.to_str()

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's entry for an id (a byte-level BPE writes bytes as printable stand-ins)."""
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for `text`. Rendered chats already begin with BOS, so they use the default (False);
        raw prompts pass True to get BOS prepended, like transformers' `tokenizer(text)`. A text that needs more
        than `max_tokens` tokens is refused (PromptTooLongError) after at most about that many are made."""
        if self.max_tokens is not None and len(text) > PIECE_CHARS:
            self._refuse_too_long(text, self.max_tokens)
        return self._encode(text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return guarded(self.source, "encoding a text",
                           lambda: self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        except TypeError:  # the library takes only valid Unicode: a lone surrogate (from undecodable input)
            bad = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
            if bad is None:
                raise
            raise GenerationError(f"the text holds a lone surrogate (U+{ord(bad):04X}), which is not Unicode "
                                  "text; expected UTF-8 text") from None

    def _refuse_too_long(self, text: str, limit: int) -> None:
        """Count `text`'s tokens a piece at a time, each cut before a space or newline, and refuse it once the
        pieces need `limit` tokens even after the most that tokens across the cuts could save (a cut splits at
        most two tokens of the whole text, each into at most `max_token_chars` pieces): memory and time follow
        the limit, not the text (the library holds a few hundred bytes per token until it is done)."""
        counted, start, cuts = 0, 0, 0
        while start < len(text):
            end = min(start + PIECE_CHARS, len(text))
            if end < len(text):
                half = start + PIECE_CHARS // 2
                cut = max(text.rfind(" ", half, end), text.rfind("\n", half, end))
                end, cuts = (cut if cut > start else end), cuts + 1
            counted += len(self._encode(text[start:end], False))
            least = counted - cuts * 2 * self.max_token_chars
            if least >= limit:
                raise PromptTooLongError(
                    f"the prompt needs more than {limit:,} tokens (its first {end:,} of {len(text):,} characters "
                    f"alone take {least:,}) but the model's context holds {limit:,}; shorten it")
            start = end

    def encode_within(self, text: str, limit: int, add_special_tokens: bool = False) -> list[int] | None:
        """`encode(text)`, or None when `text` certainly needs `limit` tokens or more (counted in pieces, as
        `encode` does for `max_tokens`: memory follows `limit`, not the text). The ids returned may still be over
        `limit`: the caller compares their number."""
        if len(text) > PIECE_CHARS:
            try:
                self._refuse_too_long(text, limit)
            except PromptTooLongError:
                return None
        return self._encode(text, add_special_tokens)

    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (its vocabulary string, special tokens included): a text of
        n characters needs at least about n / max_token_chars tokens."""
        if self._max_token_chars is None:
            self._max_token_chars = max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1) or 1
        return self._max_token_chars

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        if not isinstance(ids, list):
            ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return guarded(self.source, "decoding tokens",
                       lambda: self._tok.decode(ids, skip_special_tokens=skip_special_tokens), quiet=False)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tools: list | None = None, **template_kwargs: Any) -> str:
        """The prompt text for `messages`, byte-identical to transformers' `apply_chat_template(tokenize=False)`."""
        # Like transformers: a dedicated tool-use template wins when tools are given.
        template = self.templates.get("tool_use") if tools is not None else None
        template = template or self.chat_template
        if self.pad_token is not None:
            template_kwargs.setdefault("pad_token", self.pad_token)
        return _chat_template.render(
            template, list(messages), bos_token=self.bos_token, eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt, tools=tools, template_source=self.template_source,
            **template_kwargs,
        )


def _read_backend(file: Path) -> tuple[Any, int]:
    """The library's tokenizer for `file`, once its sizes are checked (`tokenizer_limits`), and the length of
    its longest token. The text read is the text the library parses: nothing is read twice."""
    from tokenizers import Tokenizer as Backend

    try:
        text = read_regular(file, FILE_LIMIT).decode("utf-8")
        longest = check_tokenizer_json(parse_json(text))
    except ConfigError as e:
        raise CheckpointError(f"{e}: the checkpoint needs a valid tokenizer.json") from None
    except ValueError as e:  # not UTF-8, not JSON, or sizes past the limits: the cause is in the message
        cause = e.msg if hasattr(e, "msg") else "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
        raise CheckpointError(f"{file}: {cause}; the checkpoint needs a valid tokenizer.json") from None
    try:
        return guarded(file, "reading its file", lambda: Backend.from_str(text)), longest
    except CheckpointError:  # it panicked: already one line naming the file
        raise
    except Exception as e:  # the Rust library raises plain Exceptions for any parse problem
        raise CheckpointError(
            f"cannot read {file} ({' '.join(str(e).split())[:200]}): the checkpoint needs a valid tokenizer.json"
        ) from None


def load_tokenizer(path: Path, max_tokens: int | None = None) -> Tokenizer:
    """Load the tokenizer files of the checkpoint directory `path`. `max_tokens`: the model's context; longer
    texts are refused as they are encoded (see `Tokenizer.encode`)."""
    path = Path(path)
    file = path / "tokenizer.json"
    if not file.exists() and not file.is_symlink():
        raise CheckpointError(
            f"{path} has no tokenizer.json: the checkpoint needs its tokenizer files "
            "(tokenizer.json, tokenizer_config.json); download the full model again"
        )
    backend, longest = _read_backend(file)
    config = _read_json(path / "tokenizer_config.json")
    special_map = _read_json(path / "special_tokens_map.json")

    def special(name: str, lfm2_default: str) -> str | None:
        for source in (config, special_map):
            token = token_text(source.get(name))
            if token is not None:
                return token
        # LFM2 checkpoints without configs still use the LFM2 control tokens.
        return lfm2_default if backend.token_to_id(lfm2_default) is not None else None

    tokenizer = Tokenizer(
        backend,
        bos_token=special("bos_token", "<|startoftext|>"),
        eos_token=special("eos_token", "<|im_end|>"),
        pad_token=special("pad_token", "<|pad|>"),
        templates=_templates(path, config),
    )
    tokenizer.source, tokenizer.max_tokens, tokenizer._max_token_chars = str(file), max_tokens, longest
    template_file = path / TEMPLATE_FILE  # the one _templates preferred, when it is there
    tokenizer.template_source = str(template_file if template_file.is_file() else path / "tokenizer_config.json")
    return tokenizer
