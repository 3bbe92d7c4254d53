"""`lfm2 info MODEL`: describe a checkpoint without loading its weights (never imports torch; `--plan` does, to
decide the decode plan for this machine, and still reads no weight)."""

from __future__ import annotations

from pathlib import Path

import typer

from lfm2cli.commands import options as o


def decode_plan(path: Path, device: str, dtype: str, quantize: str, compile: bool) -> tuple[str, list[dict]]:
    """The decode plan loading `path` with these options would follow on this machine, from its config alone: a
    title line and the rows (`lfm2cli.kernels.plan.Plan.table`)."""
    from lfm2cli.kernels.plan import dtype_name, plan
    from lfm2cli.kernels.quantize import check_mode
    from lfm2cli.loading.loader import configure_threads, resolve_device, resolve_dtype
    from lfm2cli.model.config import load_config

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    configure_threads(dev)
    p = plan(load_config(path), dev, dt, quantize=check_mode(quantize), compile=compile)
    title = f"decode plan on this machine ({dev.type}, {dtype_name(dt)}; which code runs each part):"
    return title, p.table()


def info(
    model: str = typer.Argument(..., metavar="MODEL", help="Checkpoint directory, hub repo id or alias."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object for scripts."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network; use the local cache."),
    plan: bool = typer.Option(False, "--plan", help="Also show the decode plan: which code would run each part of "
                                                     "the model on this machine, with the options below."),
    device: o.Device = o.DEVICE,
    dtype: o.Dtype = o.DTYPE,
    quantize: o.Quantize = o.QUANTIZE,
    compile: bool = o.COMPILE,
) -> None:
    """Describe a checkpoint without loading its weights: architecture, layers, parameters, tokens, files, memory.

    Exits 1 when the checkpoint fails the check that loading runs.

    Examples:

    lfm2 info lfm2-1.2b
    lfm2 info ./my-checkpoint --json
    lfm2 info lfm2-1.2b --plan --quantize int8
    """
    import json
    import sys

    from lfm2cli.hub.names import resolve_model
    from lfm2cli.loading.describe import describe, plain_lines

    path = resolve_model(model, offline=offline, pull_option=False)  # info has no --pull
    desc = describe(path)
    title, rows = decode_plan(path, device, dtype, quantize, compile) if plan and not desc["problems"] else ("", [])
    if json_out:
        print(json.dumps({**desc, "plan": rows} if plan else desc, indent=2))
    elif sys.stdout.isatty():
        from lfm2cli.loading.describe import sections
        from lfm2cli.terminal.render import print_sections

        print_sections(sections(desc))
    else:
        from lfm2cli.terminal.safetext import visible

        print(visible("\n".join(plain_lines(desc))))  # token strings from the files, shown, never acted on
    if rows and not json_out:
        from lfm2cli.kernels.plan import plan_lines

        print("\n".join(["", title, *plan_lines(rows)]))
    if desc["problems"]:
        # described as far as it can be, but a checkpoint that would not load fails the check: exit 1 for scripts
        from lfm2cli.errors import CheckpointError

        sys.stdout.flush()
        raise CheckpointError("; ".join(desc["problems"]))
