"""Options shared by `generate`, `chat` and `bench`, declared once so their names and help agree."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer

MODEL = typer.Argument(None, help="Checkpoint directory, hub repo id or alias (default: the smallest LFM2).",
                       show_default=False)
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")
DTYPE = typer.Option("auto", "--dtype", help="auto, bfloat16, float16 or float32.")


def _checked(name: str) -> Callable[[Any], Any]:
    """An option callback that applies the sampling setting's one rule (lfm2cli.sampling.validate_setting),
    so the command line accepts exactly what /set accepts; the error names the option and its value."""

    def check(value: Any) -> Any:
        from lfm2cli.sampling import flag, validate_setting

        return validate_setting(name, value, label=flag(name))

    return check


MAX_TOKENS = typer.Option(1024, "--max-tokens", "-n", callback=_checked("max_tokens"),
                          help="Most tokens to generate (>= 1).")
SYSTEM = typer.Option(None, "--system", "-s", help="System prompt.")
TEMPERATURE = typer.Option(0.3, "--temperature", "-t", callback=_checked("temperature"),
                           help="Sampling temperature, >= 0 (0 is greedy).")
TOP_K = typer.Option(0, "--top-k", callback=_checked("top_k"),
                     help="Keep the k likeliest tokens, >= 0 (0: off).")
TOP_P = typer.Option(1.0, "--top-p", callback=_checked("top_p"), help="Nucleus sampling mass, in (0, 1] (1: off).")
MIN_P = typer.Option(0.15, "--min-p", callback=_checked("min_p"),
                     help="Drop tokens below min-p x the best one's chance, in [0, 1].")
REPETITION_PENALTY = typer.Option(1.05, "--repetition-penalty", callback=_checked("repetition_penalty"),
                                  help="Penalty on tokens already seen, > 0 (1: off).")
SEED = typer.Option(None, "--seed", callback=_checked("seed"),
                    help="Random seed (0 to 2**63-1), for reproducible sampling.")
OFFLINE = typer.Option(False, "--offline", help="Never touch the network (also HF_HUB_OFFLINE=1).")
PULL = typer.Option(False, "--pull", help="Download the model without asking if it is not cached.")
QUANTIZE = typer.Option("none", "--quantize", help="none, int8 or int4: weights quantised while loading "
                        "(int8: half the memory of bf16, int4: under a third; faster decode on CPU).")
FORCE = typer.Option(False, "--force", help="Load the model even when it looks too big for the free memory.")
COMPILE = typer.Option(False, "--compile/--no-compile", help="Compile the decode step with torch.compile "
                       "(needs a C++ compiler; the first run compiles, later runs use the cache).")
SCHEMA = typer.Option(None, "--schema", metavar="FILE|JSON", show_default=False,
                      help="Constrain the answer to JSON that validates against this JSON schema (a file, or the "
                           "schema inline).")
FORMAT = typer.Option("text", "--format", help="text, or json: the answer is always one JSON object.")
TOOL_CHOICE = typer.Option("auto", "--tool-choice", metavar="auto|required|NAME",
                           help="With tools: auto lets the model choose; required makes it call a tool, NAME that "
                                "one (the call is constrained to the tool's schema).")
def _budget(value: int | None) -> int | None:
    if value is not None and value < 0:
        from lfm2cli.errors import UsageError

        raise UsageError(f"--think-budget {value}: expected a number of tokens >= 0")
    return value


THINK_BUDGET = typer.Option(None, "--think-budget", callback=_budget, metavar="N", show_default=False,
                            help="Close a thinking model's reasoning after N tokens, so it answers.")
ENDPOINT = typer.Option(None, "--endpoint", metavar="URL", show_default=False,
                        help="Generate on an OpenAI-compatible server (vLLM, SGLang, lfm2 serve) instead of "
                             "loading the model here, e.g. http://127.0.0.1:8000/v1.")
API_KEY = typer.Option(None, "--api-key", envvar="LFM2_API_KEY", metavar="KEY", show_default=False,
                       help="The --endpoint server's API key (also LFM2_API_KEY).")
REMOTE_MODEL = typer.Option(None, "--remote-model", metavar="NAME", show_default=False,
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
    from lfm2cli.structured import choose_grammar, read_schema

    return choose_grammar(read_schema(schema) if schema is not None else None, fmt, tools, tool_choice)


def sampling_params(temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float,
                    seed: int | None):  # -> SamplingParams (imported lazily)
    from lfm2cli.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed).validate()


def load_local(model: str | None, *, offline: bool, pull: bool,
               announce: Callable[[Any], None] | None = None, **load_options: Any):  # -> (Path, LoadedModel)
    """The model generate, chat and serve run here: the name resolved (asking before a download on a terminal),
    `announce(path)` before the load, then the checkpoint loaded and the options it could not apply noted."""
    from lfm2cli.commands.confirm import confirm_download
    from lfm2cli.hub.names import resolve_model
    from lfm2cli.loading import load

    path = resolve_model(model, offline=offline, pull=pull, confirm=confirm_download())
    if announce is not None:
        announce(path)
    lm = load(path, **load_options)
    report_skipped(lm.skipped)
    return path, lm


def report_skipped(skipped: dict[str, str]) -> None:
    """One note on stderr per option the loader could not apply (`--compile ignored: ...`)."""
    for option, reason in skipped.items():
        sys.stderr.write(f"note: --{option} ignored: {reason}\n")
