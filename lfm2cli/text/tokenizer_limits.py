"""A checkpoint's `tokenizer.json` checked before the `tokenizers` library sees it, and that library's failures
kept to one line.

The library trusts its file: a `Replace` whose content is megabytes long multiplies every text by that much, a
vocabulary string of a megabyte comes out of every decode, and a regex that backtracks without end makes its
Rust code panic (`pyo3_runtime.PanicException`, a BaseException that `except Exception` misses) after printing
the panic to the process's stderr. So the file's sizes are checked here first, and calls into the library run
under `guarded`, which turns a panic into one CheckpointError and, for encoding (where regexes run), keeps the
library's own report of it out of the user's terminal.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from lfm2cli.errors import CheckpointError

T = TypeVar("T")

FILE_LIMIT = 64 << 20  # bytes of tokenizer.json; the largest published ones are about 35 MB
MAX_TOKEN_CHARS = 512  # characters of one vocabulary or added token; real ones stay under 300
MAX_STRING = 4096  # characters of one string in the text pipeline (a regex, a prefix, a special token's text)
MAX_CHARSMAP = 8 << 20  # a SentencePiece `precompiled_charsmap` (base64), a few hundred kB in real files
MAX_NODES = 4096  # values in one pipeline section (normalizer, pre-tokenizer, post-processor, decoder)
MAX_GROWTH = 16  # how many times longer the `Replace` steps of one section may make a text, together
PIPELINE = ("normalizer", "pre_tokenizer", "post_processor", "decoder")


def _walk(value: Any, depth: int = 0) -> Iterator[tuple[str | None, Any]]:
    """Every (key, value) below `value`, depth first; keys are None inside lists."""
    if depth > 64:
        raise ValueError("nested more than 64 levels deep")
    items = value.items() if isinstance(value, dict) else ((None, v) for v in value) if isinstance(
        value, list) else ()
    for key, item in items:
        yield key, item
        yield from _walk(item, depth + 1)


def _check_section(name: str, section: Any) -> None:
    """One pipeline section: bounded in values and string lengths, and its Replace steps together grow a text at
    most MAX_GROWTH times (each step by at most one plus its content's length, for a pattern that matches
    between characters)."""
    growth, nodes = 1, 0
    for key, value in itertools.chain([(None, section)], _walk(section)):
        nodes += 1
        if nodes > MAX_NODES:
            raise ValueError(f"the {name} has more than {MAX_NODES:,} values")
        if isinstance(value, str):
            limit = MAX_CHARSMAP if key == "precompiled_charsmap" else MAX_STRING
            if len(value) > limit:
                raise ValueError(f"the {name} has a {key or 'list'} string of {len(value):,} characters "
                                 f"(at most {limit:,})")
        if name == "decoder" and isinstance(value, dict) and value.get("type") == "Replace" \
                and isinstance(value.get("pattern"), dict) and "Regex" in value["pattern"]:
            # decoding runs once per generated token, so it is kept free of regex panics (see `guarded`)
            raise ValueError("the decoder's Replace matches a regex; expected a plain string pattern")
        if isinstance(value, dict) and value.get("type") == "Replace" and isinstance(value.get("content"), str):
            growth *= 1 + len(value["content"])
            if growth > MAX_GROWTH:
                raise ValueError(f"the {name}'s Replace steps make a text up to {growth:,} times longer "
                                 f"(content {len(value['content']):,} characters long; at most {MAX_GROWTH} "
                                 "times in all)")


def _vocabulary(data: dict[str, Any]) -> Iterator[Any]:
    """Every token string of the model's vocabulary (a dict for BPE/WordPiece/WordLevel, [piece, score] pairs
    for Unigram) and of the added tokens."""
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        yield from vocab
    elif isinstance(vocab, list):
        yield from (v[0] if isinstance(v, list) and v else v for v in vocab)
    for token in data.get("added_tokens") or ():
        yield token.get("content") if isinstance(token, dict) else token


def check_tokenizer_json(data: Any) -> int:
    """Raise ValueError (with the cause) where `data`, a parsed tokenizer.json, declares sizes the tokenizer
    would act on without bound; return the longest token's length in characters."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    if not isinstance(data.get("model"), dict):
        raise ValueError("'model' is missing or not an object")
    for name in PIPELINE:
        _check_section(name, data.get(name))
    longest = 1
    for token in _vocabulary(data):
        if isinstance(token, str):
            if len(token) > MAX_TOKEN_CHARS:
                raise ValueError(f"a token of {len(token):,} characters ({token[:20]!r}...; at most "
                                 f"{MAX_TOKEN_CHARS:,})")
            longest = max(longest, len(token))
    return longest


# ---- calls into the library


def _is_panic(error: BaseException) -> bool:
    return type(error).__name__ == "PanicException"  # pyo3_runtime's class, which cannot be imported by name


_lock = threading.Lock()  # the stderr redirection is process-wide: one library call under it at a time
_sink: Any = None  # an unlinked temporary file that takes the library's stderr during a call


def _redirect() -> int | None:
    """Point fd 2 at the sink; the saved fd 2, or None where there is none to save (a daemon) or no temp dir."""
    global _sink
    try:
        if _sink is None:
            _sink = tempfile.TemporaryFile()
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        return None
    os.dup2(_sink.fileno(), 2)
    return saved


def _restore(saved: int, keep: bool) -> None:
    """fd 2 back as it was; what was written to the sink meanwhile is passed on when `keep`, else dropped."""
    os.dup2(saved, 2)
    os.close(saved)
    fd = _sink.fileno()
    size = os.lseek(fd, 0, os.SEEK_END)
    if not size:
        return
    os.lseek(fd, 0, os.SEEK_SET)
    written = os.read(fd, min(size, 1 << 16))
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    if keep:
        try:
            os.write(2, written)
        except OSError:
            pass


def guarded(source: str | Path, what: str, call: Callable[[], T], quiet: bool = True) -> T:
    """`call()` into the tokenizers library; a Rust panic becomes one CheckpointError naming `source` (the
    tokenizer file) and `what` was being done. Other exceptions pass unchanged. With `quiet`, what was written to
    fd 2 during the call is dropped after a panic (Rust's report of it, written before Python sees the exception)
    and passed on otherwise (another thread's lines, say); without it (decoding, once per token, where no regex
    runs) the call costs nothing extra."""
    if not quiet:
        try:
            return call()
        except BaseException as e:
            if not _is_panic(e):
                raise
            raise _failed(source, what, e) from None
    with _lock:
        saved = _redirect()
        panicked = False
        try:
            return call()
        except BaseException as e:
            if not _is_panic(e):
                raise
            panicked = True
            raise _failed(source, what, e) from None
        finally:
            if saved is not None:
                _restore(saved, keep=not panicked)


def _failed(source: str | Path, what: str, panic: BaseException) -> CheckpointError:
    cause = " ".join(str(panic).split())[:200] or "a panic"
    return CheckpointError(f"{source}: the tokenizer failed while {what} ({cause}); the checkpoint's "
                           "tokenizer.json cannot handle this text")
