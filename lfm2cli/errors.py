"""Errors the CLI knows how to explain: each carries a one-line message and an exit code."""

from __future__ import annotations


class Lfm2Error(Exception):
    """Base for every error shown to the user as one line (no traceback unless LFM2_DEBUG=1)."""

    exit_code = 1


class UsageError(Lfm2Error):
    """Bad option values or arguments: exit code 2, like click's own usage errors."""

    exit_code = 2


class CheckpointError(Lfm2Error):
    """A checkpoint directory is missing files, or its files are inconsistent."""


class ConfigError(CheckpointError):
    """config.json cannot be understood."""


class HubError(Lfm2Error):
    """Downloading from, or resolving against, the Hugging Face hub failed."""


class GenerationError(Lfm2Error):
    """The request cannot be generated (empty prompt, prompt longer than the context, ...)."""


class PromptTooLongError(GenerationError):
    """A text needs more tokens than the model's context holds (found before all of it is encoded)."""


class HistoryError(Lfm2Error):
    """The history database cannot be used, or a conversation id does not match."""


class MemoryLimitError(Lfm2Error):
    """The model would not fit in the memory available; the message names a precision that would."""


class TemplateError(CheckpointError):
    """A checkpoint's chat template ran out of its budget (time, steps, sizes) or rendered nothing."""
