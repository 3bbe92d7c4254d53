"""`lfm2 bench`: measure prefill and decode speed (see lfm2cli/bench.py for what is measured and how)."""

from __future__ import annotations

import sys

import typer

from lfm2cli.commands import options as o


def _lengths(values: list[str] | None) -> list[int]:
    """`--prompt-tokens 128 --prompt-tokens 512` or `--prompt-tokens 128,512`."""
    from lfm2cli.errors import UsageError

    out: list[int] = []
    for value in values or ["128,512"]:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or int(part) < 1:
                raise UsageError(f"--prompt-tokens takes whole numbers >= 1 (e.g. 128,512), not {part!r}")
            out.append(int(part))
    return list(dict.fromkeys(out))


def bench(
    model: str = typer.Argument(None, help="Checkpoint directory, hub repo id or alias; with --random, a published "
                                "model's alias (lfm2-350m, lfm2-1.2b, lfm2-8b-a1b, ...) or a config.json.",
                                show_default=False),
    prompt_tokens: list[str] = typer.Option(None, "--prompt-tokens", help="Prompt lengths (repeatable or comma "
                                            "list).  [default: 128,512]", show_default=False),
    gen_tokens: int = typer.Option(64, "--gen-tokens", min=2, help="Tokens generated per run."),
    repeat: int = typer.Option(3, "--repeat", min=1, help="Runs per prompt length."),
    random: bool = typer.Option(False, "--random", help="Random weights in the model's shape: no download."),
    device: str = o.DEVICE,
    dtype: str = o.DTYPE,
    quantize: str = o.QUANTIZE,
    compile: bool = o.COMPILE,
    force: bool = o.FORCE,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object for scripts."),
    offline: bool = o.OFFLINE,
    pull: bool = o.PULL,
) -> None:
    """Measure prefill and decode speed, time to first token and peak memory; decode is also shown as a
    share of the ceiling that this machine's memory bandwidth sets."""
    from lfm2cli.benchmark import COLUMNS, rows, summary
    from lfm2cli.benchmark import bench as run_bench
    from lfm2cli.commands.confirm import confirm_download
    from lfm2cli.render import print_report

    def progress(message: str) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\r\033[K{message}")
            sys.stderr.flush()

    result = run_bench(model, random_weights=random, prompt_lengths=_lengths(prompt_tokens), gen_tokens=gen_tokens,
                       repeat=repeat, device=device, dtype=dtype, quantize=quantize, compile=compile,
                       offline=offline, force=force, pull=pull, confirm=confirm_download(), progress=progress)
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    o.report_skipped(result.skipped)
    if json_out:
        import json

        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_report(summary(result), COLUMNS, rows(result), plain=not sys.stdout.isatty())
