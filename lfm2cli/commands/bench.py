"""`lfm2 bench`: measure prefill and decode speed (see lfm2cli/benchmark.py for what is measured and how), and
show the decode plan the model ran with."""

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
    model: str = typer.Argument(None, metavar="MODEL", show_default=False,
                                help="Checkpoint directory, hub repo id or alias; with --random, a published model's "
                                     "alias (lfm2-350m, lfm2-1.2b, lfm2-8b-a1b, ...) or a config.json."),
    prompt_tokens: list[str] = typer.Option(["128,512"], "--prompt-tokens", metavar="N[,N...]",
                                            help="Prompt lengths (repeatable or comma list)."),
    gen_tokens: int = typer.Option(64, "--gen-tokens", min=2, metavar="N", help="Tokens generated per run."),
    repeat: int = typer.Option(3, "--repeat", min=1, metavar="N", help="Runs per prompt length."),
    random: bool = typer.Option(False, "--random", help="Random weights in the model's shape: no download."),
    json_out: bool = typer.Option(False, "--json", rich_help_panel=o.OUTPUT_PANEL,
                                  help="Print one JSON object for scripts."),
    offline: bool = o.OFFLINE,
    pull: bool = o.PULL,
    force: bool = o.FORCE,
    device: o.Device = o.DEVICE,
    dtype: o.Dtype = o.DTYPE,
    quantize: o.Quantize = o.QUANTIZE,
    compile: bool = o.COMPILE,
) -> None:
    """Measure prefill and decode speed, time to first token and peak memory.

    Decode speed is also shown as a share of the ceiling that this machine's memory bandwidth sets.

    Examples:

    lfm2 bench lfm2-350m
    lfm2 bench --random lfm2-8b-a1b --quantize int8 --prompt-tokens 512
    lfm2 bench ./my-checkpoint --json > bench.json
    """
    from lfm2cli.commands.confirm import confirm_download

    lengths = _lengths(prompt_tokens)
    if not random:
        from lfm2cli.hub.names import resolve_model

        # before torch is imported: a model that is nowhere is said at once, and a download comes first
        model = str(resolve_model(model, offline=offline, pull=pull, confirm=confirm_download()))

    from lfm2cli.benchmark import COLUMNS, plan_report, rows, summary
    from lfm2cli.benchmark import bench as run_bench
    from lfm2cli.terminal.load_progress import StatusLine
    from lfm2cli.terminal.render import print_report

    status = StatusLine()
    try:
        result = run_bench(model, random_weights=random, prompt_lengths=lengths, gen_tokens=gen_tokens,
                           repeat=repeat, device=device, dtype=dtype, quantize=quantize, compile=compile,
                           offline=offline, force=force, pull=pull, progress=status.say, load_progress=status.load)
    finally:
        status.close()
    o.report_skipped(result.skipped)
    if json_out:
        import json

        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_report(summary(result), COLUMNS, rows(result), plain=not sys.stdout.isatty())
        print("\n".join(["", *plan_report(result)]))
