"""The checkpoint's tokenizer (`tokenizer.json` via the `tokenizers` library) plus what
`tokenizer_config.json` says about special tokens and the chat template."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lfm2cli import chat_template as _chat_template
from lfm2cli.config import read_json_object
from lfm2cli.errors import CheckpointError

TEMPLATE_FILE = "chat_template.jinja"


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
    if file.is_file():
        try:
            return {"default": file.read_text(encoding="utf-8")}
        except (OSError, UnicodeDecodeError) as e:
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

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for `text`. Rendered chats already begin with BOS, so they use the default (False);
        raw prompts pass True to get BOS prepended, like transformers' `tokenizer(text)`."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        if not isinstance(ids, list):
            ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

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

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    tools: list | None = None, **template_kwargs: Any) -> list[int]:
        """Render and encode a chat (the template writes BOS itself, so none is added here)."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(path: Path) -> Tokenizer:
    """Load the tokenizer files of the checkpoint directory `path`."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(
            f"{path} has no tokenizer.json: the checkpoint needs its tokenizer files "
            "(tokenizer.json, tokenizer_config.json); download the full model again"
        )
    try:
        backend = Backend.from_file(str(file))
    except Exception as e:  # the Rust library raises plain Exceptions for any parse problem
        raise CheckpointError(
            f"cannot read {file} ({' '.join(str(e).split())[:200]}): the checkpoint needs a valid tokenizer.json"
        ) from None
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
    template_file = path / TEMPLATE_FILE  # the one _templates preferred, when it is there
    tokenizer.template_source = str(template_file if template_file.is_file() else path / "tokenizer_config.json")
    return tokenizer
