"""Options shared by `generate`, `chat`, `serve` and `bench`, declared once so their names, help and panels agree;
and the command classes that shape every command's `--help`."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from enum import Enum
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

# `--help` groups options in these panels; the rest (the prompt, what the command itself is about) stay in "Options"
MODEL_PANEL = "Model"
SAMPLING_PANEL = "Sampling"
OUTPUT_PANEL = "Output"
TOOLS_PANEL = "Tools"
PERFORMANCE_PANEL = "Performance"


def _help_and_examples(text: str | None) -> tuple[str | None, str | None]:
    """A docstring as help and epilog: each paragraph on one line, so the terminal's width wraps it (typer keeps
    the docstring's own line breaks, which break sentences mid-way), and an "Examples:" paragraph and what
    follows it moved to the epilog, after the options, one example a line."""
    if not text:
        return text, None
    paragraphs = inspect.cleandoc(text).split("\n\n")
    cut = next((i for i, p in enumerate(paragraphs) if p.strip() == "Examples:"), len(paragraphs))
    help_text = "\n\n".join(" ".join(p.split()) for p in paragraphs[:cut])
    examples = "\n".join(line for p in paragraphs[cut + 1:] for line in p.splitlines())
    return help_text, (f"Examples:\n\n{examples}" if examples else None)


def _bare_flags(params: list[Any]) -> list[Any]:
    """On/off flags take no value: no `<bool>` beside them in `--help` (an empty metavar shows nothing)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Shaped:
    """Help text reflowed, examples in the epilog, flags without a metavar: mixed into Command and Group."""

    help: str | None
    epilog: str | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help, examples = _help_and_examples(self.help)
        self.epilog = self.epilog or examples

    def get_params(self, ctx: Any) -> list[Any]:
        return _bare_flags(super().get_params(ctx))  # type: ignore[misc]


class Command(_Shaped, TyperCommand):
    """Every lfm2 command: help text reflowed, examples in the epilog, flags without a metavar."""


class Group(_Shaped, TyperGroup):
    """`lfm2` and `lfm2 history`: as Command, for a group's own help and options; and, run as the program, its
    usage errors (an unknown option, a value not among the choices) in one line, as lfm2's own errors are."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        # newer typers carry their own click: its exception classes are reached through the one typer exports
        click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click_error as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `lfm2` alone: typer has printed the help already
                raise SystemExit(e.exit_code) from None
            _usage_error(e)
        except typer.Abort:
            _usage_error(None)
        raise SystemExit(code if isinstance(code, int) else 0)  # typer.Exit(N) comes back as N


def _usage_error(error: Any) -> None:
    """One line on stderr for typer's usage error (None: an aborted prompt), then its exit code."""
    from lfm2cli.terminal.safetext import visible_line

    if error is None:
        message, code = "aborted", 1
    else:
        # typer's message can span lines and says "Value error, " before a choice it refused
        message, code = " ".join(error.format_message().split()).replace("Value error, ", ""), error.exit_code
        ctx = getattr(error, "ctx", None)
        if ctx is not None and code == 2:
            message = f"{message.rstrip('.')}; see `{ctx.command_path} --help`"
    sys.stderr.write(f"error: {visible_line(message)}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _plain(value: Any) -> Any:
    """A choice's plain string, so the command's body and the library see "int8", never an Enum member."""
    return value.value if isinstance(value, Enum) else value


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Dtype(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Quantize(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


class Format(str, Enum):
    text = "text"
    json = "json"


class Think(str, Enum):
    """How `chat` shows a thinking model's reasoning (`generate` takes show or hide: ThinkShown)."""

    show = "show"
    hide = "hide"
    fold = "fold"


class ThinkShown(str, Enum):
    show = "show"
    hide = "hide"


def choice(default: str, *names: str, **kwargs: Any) -> Any:
    """An option whose value is one of its Enum annotation's (any case); the command receives the plain string."""
    return typer.Option(default, *names, case_sensitive=False, callback=_plain, **kwargs)


def complete_model(incomplete: str) -> list[str]:
    """Tab completion of MODEL: the aliases of the published models, and the folders under the path being typed."""
    import os
    from pathlib import Path

    from lfm2cli.hub.names import ALIASES

    found = [alias for alias in ALIASES if alias.startswith(incomplete.lower())]
    tail = incomplete.rpartition("/")[2]
    head = incomplete[:len(incomplete) - len(tail)]
    try:
        folders = sorted(p.name for p in Path(os.path.expanduser(head or ".")).iterdir()
                         if p.name.startswith(tail) and (tail.startswith(".") or not p.name.startswith("."))
                         and p.is_dir())
    except OSError:
        folders = []
    return found + [f"{head}{name}/" for name in folders]


MODEL = typer.Argument(None, metavar="MODEL", show_default=False, autocompletion=complete_model,
                       help="Checkpoint directory, hub repo id or alias (default: the smallest LFM2).")
DEVICE = choice("auto", "--device", rich_help_panel=PERFORMANCE_PANEL,
                help="Where to run. auto: a CUDA GPU, else Apple's MPS, else the CPU.")
DTYPE = choice("auto", "--dtype", rich_help_panel=PERFORMANCE_PANEL,
               help="Weight and compute type. auto: bfloat16 where this machine runs it fast (float16 on a GPU "
                    "without it), else float32.")


def _checked(name: str) -> Callable[[Any], Any]:
    """An option callback that applies the sampling setting's one rule (lfm2cli.decoding.sampling.validate_setting),
    so the command line accepts exactly what /set accepts; the error names the option and its value."""

    def check(value: Any) -> Any:
        from lfm2cli.decoding.sampling import flag, validate_setting

        return validate_setting(name, value, label=flag(name))

    return check


MAX_TOKENS = typer.Option(1024, "--max-tokens", "-n", callback=_checked("max_tokens"), metavar="N",
                          rich_help_panel=SAMPLING_PANEL, help="Most tokens to generate (>= 1).")
SYSTEM = typer.Option(None, "--system", "-s", metavar="TEXT", help="System prompt.")
TEMPERATURE = typer.Option(0.3, "--temperature", "-t", callback=_checked("temperature"), rich_help_panel=SAMPLING_PANEL,
                           help="Sampling temperature, >= 0 (0 is greedy).")
TOP_K = typer.Option(0, "--top-k", callback=_checked("top_k"), rich_help_panel=SAMPLING_PANEL,
                     help="Keep the k likeliest tokens, >= 0 (0: off).")
TOP_P = typer.Option(1.0, "--top-p", callback=_checked("top_p"), rich_help_panel=SAMPLING_PANEL,
                     help="Nucleus sampling mass, in (0, 1] (1: off).")
MIN_P = typer.Option(0.15, "--min-p", callback=_checked("min_p"), rich_help_panel=SAMPLING_PANEL,
                     help="Drop tokens below min-p x the best one's chance, in [0, 1].")
REPETITION_PENALTY = typer.Option(1.05, "--repetition-penalty", callback=_checked("repetition_penalty"),
                                  rich_help_panel=SAMPLING_PANEL, help="Penalty on tokens already seen, > 0 (1: off).")
PRESENCE_PENALTY = typer.Option(0.0, "--presence-penalty", callback=_checked("presence_penalty"),
                                rich_help_panel=SAMPLING_PANEL,
                                help="Subtracted once from each token the reply already holds, in [-2, 2] (0: off).")
FREQUENCY_PENALTY = typer.Option(0.0, "--frequency-penalty", callback=_checked("frequency_penalty"),
                                 rich_help_panel=SAMPLING_PANEL,
                                 help="Subtracted per occurrence from each token the reply already holds, in [-2, "
                                      "2] (0: off).")


def logit_bias(values: list[str] | None) -> dict[int, float]:
    """Every --logit-bias value (ID=BIAS pairs or a JSON object) merged, checked by the setting's rule."""
    from lfm2cli.decoding.sampling import parse_bias, validate_setting

    merged: dict[int, float] = {}
    for text in values or []:
        merged |= validate_setting("logit_bias", parse_bias(text), label="--logit-bias")
    return validate_setting("logit_bias", merged, label="--logit-bias")


def _bias(values: list[str] | None) -> list[str] | None:
    logit_bias(values)  # checked as the command line is parsed; typer keeps the option a list
    return values


LOGIT_BIAS = typer.Option(None, "--logit-bias", callback=_bias, metavar="ID=BIAS", show_default=False,
                          rich_help_panel=SAMPLING_PANEL,
                          help="Add BIAS (-100 to 100) to token ID's logit: -100 bans it, 100 forces it "
                               "(repeatable; also 'ID=BIAS,ID=BIAS' or a JSON object).")
SEED = typer.Option(None, "--seed", callback=_checked("seed"), metavar="N", rich_help_panel=SAMPLING_PANEL,
                    help="Random seed (0 to 2**63-1), for reproducible sampling.")
OFFLINE = typer.Option(False, "--offline", rich_help_panel=MODEL_PANEL,
                       help="Never touch the network (also HF_HUB_OFFLINE=1).")
PULL = typer.Option(False, "--pull", rich_help_panel=MODEL_PANEL,
                    help="Download the model without asking if it is not cached.")
QUANTIZE = choice("none", "--quantize", rich_help_panel=PERFORMANCE_PANEL,
                  help="Quantise the weights while loading: int8 takes half of bf16's memory, int4 under a third; "
                       "both decode faster on CPU.")
FORCE = typer.Option(False, "--force", rich_help_panel=MODEL_PANEL,
                     help="Load the model even when it looks too big for the free memory.")
COMPILE = typer.Option(False, "--compile/--no-compile", rich_help_panel=PERFORMANCE_PANEL,
                       help="Compile the decode step with torch.compile (needs a C++ compiler; the first run "
                            "compiles, later runs use the cache).")
SCHEMA = typer.Option(None, "--schema", metavar="FILE|JSON", show_default=False, rich_help_panel=OUTPUT_PANEL,
                      help="Constrain the answer to JSON that validates against this JSON schema (a file, or the "
                           "schema inline).")
FORMAT = choice("text", "--format", rich_help_panel=OUTPUT_PANEL,
                help="json: the answer is always one JSON object (text: free text).")
TOOL_CHOICE = typer.Option("auto", "--tool-choice", metavar="auto|required|NAME", rich_help_panel=TOOLS_PANEL,
                           help="With tools: auto lets the model choose; required makes it call a tool, NAME that "
                                "one (the call is constrained to the tool's schema).")


def _budget(value: int | None) -> int | None:
    if value is not None and value < 0:
        from lfm2cli.errors import UsageError

        raise UsageError(f"--think-budget {value}: expected a number of tokens >= 0")
    return value


THINK_BUDGET = typer.Option(None, "--think-budget", callback=_budget, metavar="N", show_default=False,
                            rich_help_panel=SAMPLING_PANEL,
                            help="Close a thinking model's reasoning after N tokens, so it answers.")
ENDPOINT = typer.Option(None, "--endpoint", metavar="URL", show_default=False, rich_help_panel=MODEL_PANEL,
                        help="Generate on an OpenAI-compatible server (vLLM, SGLang, lfm2 serve) instead of "
                             "loading the model here, e.g. http://127.0.0.1:8000/v1.")
API_KEY = typer.Option(None, "--api-key", envvar="LFM2_API_KEY", metavar="KEY", show_default=False,
                       rich_help_panel=MODEL_PANEL, help="The --endpoint server's API key (also LFM2_API_KEY).")
REMOTE_MODEL = typer.Option(None, "--remote-model", metavar="NAME", show_default=False, rich_help_panel=MODEL_PANEL,
                            help="The model to ask the --endpoint server for (default: MODEL, else the first it "
                                 "lists).")


def local_only(endpoint: str | None, **given: Any) -> None:
    """Options that only mean something for a model loaded here are refused with --endpoint, not ignored."""
    if endpoint is None:
        return
    for name, value in given.items():
        if value:
            from lfm2cli.errors import UsageError

            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} applies to a model run here; with --endpoint the server decides (drop {flag})")


def output_grammar(schema: str | None, fmt: str, tools: list | None, tool_choice: str):  # -> Grammar | None
    """The grammar --schema, --format and --tool-choice ask for (checked before the model loads)."""
    from lfm2cli.decoding.constraints import choose_grammar, read_schema

    return choose_grammar(read_schema(schema) if schema is not None else None, fmt, tools, tool_choice)


def sampling_params(temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float,
                    seed: int | None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    bias: list[str] | None = None):  # -> SamplingParams (imported lazily)
    from lfm2cli.decoding.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed, presence_penalty=presence_penalty,
                          frequency_penalty=frequency_penalty, logit_bias=logit_bias(bias))


def find_local(model: str | None, *, offline: bool, pull: bool):  # -> Path | None
    """The model's directory when it is on disk, found without torch or the network so that a wrong name is
    reported at once; None when it is to be downloaded (asked about once the rest of the command line has been
    checked, by `load_local`)."""
    from lfm2cli.commands.confirm import confirm_download
    from lfm2cli.hub.names import find_model

    return find_model(model, offline=offline, pull=pull, may_download=confirm_download() is not None)


def load_local(model: str | None, *, offline: bool, pull: bool, path: Any = None,
               **load_options: Any):  # -> (Path, LoadedModel)
    """The model generate, chat and serve run here: the name resolved (asking before a download on a terminal)
    unless `path` (from `find_local`) is its directory already, then the checkpoint loaded, with a progress bar
    on a terminal, and the options it could not apply noted. torch is imported only once the name resolved."""
    from pathlib import Path

    from lfm2cli.commands.confirm import confirm_download
    from lfm2cli.hub.names import repo_id_for, resolve_model

    if path is None:
        path = resolve_model(model, offline=offline, pull=pull, confirm=confirm_download())
    if model is not None and Path(model).expanduser().is_dir():
        shown = Path(path).resolve().name
    else:  # a snapshot folder is named by its commit: the repo's name says more
        shown = repo_id_for(model).split("/")[-1]

    from lfm2cli.loading.loader import load
    from lfm2cli.terminal.load_progress import loading_bar

    with loading_bar(f"loading {shown}") as progress:
        lm = load(path, progress=progress, **load_options)
    report_skipped(lm.skipped)
    return path, lm


def report_skipped(skipped: dict[str, str]) -> None:
    """One note on stderr per option the loader could not apply (`--compile ignored: ...`)."""
    for option, reason in skipped.items():
        sys.stderr.write(f"note: --{option} ignored: {reason}\n")
