"""`lfm2 bench`: prefill and decode speed, time to first token and peak memory, with decode speed set against
the machine's memory-bandwidth ceiling (batch-1 decode reads every weight once per token, so bandwidth divided by
the bytes read per token bounds it). The bandwidth is measured in the same run: before the model is built, and
before each run by reading the model's own embedding table (no extra memory), because a shared host's bandwidth
moves from minute to minute; each run is set against the bandwidth measured next to it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lfm2cli.decoding.loop import GenerationStats, decode_tokens
from lfm2cli.decoding.sampling import argmax
from lfm2cli.errors import MemoryLimitError, UsageError
from lfm2cli.kernels.proj import Proj
from lfm2cli.loading.checkpoint import parameter_counts
from lfm2cli.loading.fit import check_fits
from lfm2cli.model.config import Lfm2Config, load_config
from lfm2cli.model.lfm2 import Lfm2ForCausalLM
from lfm2cli.system.memory import peak_memory, reset_peak_memory

BANDWIDTH_BYTES = 512 * 1024 * 1024  # far larger than any CPU cache
PROBE_MIN_BYTES = 64 * 1024 * 1024  # a table this large is read from memory, not a cache, by the per-run probe


@dataclass
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class BenchRun:
    prompt_tokens: int
    gen_tokens: int
    repeat: int
    prefill_tps: Spread
    decode_tps: Spread
    ttft_s: Spread
    ceiling_tps: Spread  # the ceiling at each run, from the bandwidth measured just before it
    decode_fraction_of_ceiling: float  # median over the runs of decode speed / that run's ceiling


@dataclass
class BenchResult:
    model: str
    architecture: str
    parameters: int
    active_parameters: int
    device: str
    dtype: str
    quantize: str
    compile: bool
    threads: int
    kernels: str  # "native avx512", "native avx2", "compiled" or "torch": see lfm2cli.kernels.plan.Plan.kernels
    kernels_note: str | None
    random_weights: bool
    load_s: float
    memory_bandwidth_gbs: float  # median of the measurements (before loading and before each run)
    memory_bandwidth_range_gbs: tuple[float, float]
    decode_bytes_per_token: int
    decode_ceiling_tps: float  # at the median bandwidth
    peak_memory_bytes: int
    runs: list[BenchRun] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # options asked for and not applied: the reasons
    plan: list[dict[str, str]] = field(default_factory=list)  # the decode plan: which code runs each part
    # the native decode kernels' tuning (lfm2cli.kernels.tuning) and its source; None when they did not run
    tuning: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- machine ----

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int = BANDWIDTH_BYTES, repeat: int = 7,
                      buf: torch.Tensor | None = None) -> float:
    """Read bandwidth in bytes/s: the best of several `sum()` passes over a buffer much larger than the caches
    (a new one of `nbytes`, or `buf`). A bf16 buffer is summed as float32 words: summing bf16 is compute-bound
    on CPUs without bf16 arithmetic (AVX2: ~0.75x the float32 sum's speed), which would understate the ceiling."""
    if buf is None:
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    if buf.dtype == torch.bfloat16 and buf.is_contiguous() and buf.numel() % 2 == 0:
        buf = buf.view(-1).view(torch.float32)
    nbytes = buf.numel() * buf.element_size()
    buf.sum()
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        buf.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    del buf
    return nbytes / best



# ---- bytes per decoded token ----

def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def decode_bytes(model: Lfm2ForCausalLM) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (one row of it is read; a tied
    head reads all of it), and in MoE layers only the routed experts (top-k of E, on average)."""
    cfg = model.config
    expert_share = cfg.num_experts_per_tok / cfg.num_experts if cfg.is_moe else 1.0
    emb = model.model.embed_tokens.weight
    total = emb.shape[1] * emb.element_size()  # the looked-up row
    if model.lm_head is None:
        total += _tensor_bytes(emb)  # tied head, not accelerated: the table itself
    for name, module in model.named_modules():
        if isinstance(module, Proj):
            total += module.nbytes() * (expert_share if ".experts." in name else 1.0)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is emb:
            continue
        total += _tensor_bytes(t) * (expert_share if ".experts." in name else 1.0)
    return int(total)


# ---- models ----

def random_config(name: str) -> tuple[Lfm2Config, str]:
    """A published model's shape by alias or repo id, or a config.json (or a directory holding one)."""
    from lfm2cli.hub.known import known_config, known_names

    cfg = known_config(name)
    if cfg is not None:
        return cfg, name
    path = Path(name).expanduser()
    if path.is_file() or (path / "config.json").is_file():
        return load_config(path), str(path)
    raise UsageError(f"--random needs a published model ({', '.join(known_names()[:6])}, ...) or a config.json; "
                     f"'{name}' is neither")


def _out_of_memory(e: BaseException, label: str) -> BaseException:
    """torch's allocator failure (a RuntimeError on CPU, OutOfMemoryError on CUDA) or MemoryError while building a
    random model becomes the tool's own out-of-memory line; any other error is passed on as it was."""
    message = str(e)
    if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in message \
            and "out of memory" not in message.lower():
        return e
    return MemoryLimitError(f"out of memory while building {label} with random weights (torch could not allocate "
                            "its tensors); try a smaller shape, --dtype bfloat16 or --quantize int8")


def greedy(logits: torch.Tensor, _seen: torch.Tensor | None = None) -> int:
    return argmax(logits)


def _run_once(model: Lfm2ForCausalLM, prompt: list[int], gen_tokens: int) -> GenerationStats:
    stats = GenerationStats()
    cache = model.new_cache(capacity=len(prompt) + gen_tokens)
    for _ in decode_tokens(model, prompt, sampler=greedy, max_tokens=gen_tokens, cache=cache, stats=stats):
        pass
    return stats


def bandwidth_probe(model: Lfm2ForCausalLM) -> Callable[[], float] | None:
    """A quick bandwidth measurement over the model's embedding table, when that table is too large for a
    cache; else None."""
    table = model.model.embed_tokens.weight
    if table.numel() * table.element_size() < PROBE_MIN_BYTES:
        return None
    return lambda: measure_bandwidth(table.device, repeat=3, buf=table)


def share_of_ceiling(stats: Sequence[GenerationStats], bandwidths: Sequence[float], bytes_per_token: int
                     ) -> float:
    """Median over runs of decode speed / the ceiling set by the bandwidth measured just before that run."""
    return statistics.median(s.decode_tps * bytes_per_token / bw for s, bw in zip(stats, bandwidths, strict=True))


def run_bench(model: Lfm2ForCausalLM, prompt_lengths: Sequence[int], gen_tokens: int, repeat: int,
              bytes_per_token: int, bandwidth: float | Callable[[], float], seed: int = 0,
              progress: Callable[[str], None] | None = None) -> tuple[list[BenchRun], list[float]]:
    """Repeat each prompt length `repeat` times, interleaved (a slow moment on a shared machine then spreads over
    all lengths instead of skewing one); random prompt tokens; greedy decoding with no stop token. `bandwidth`
    is bytes/s, or a probe called before each run. Returns the runs and the bandwidths measured."""
    probe = bandwidth if callable(bandwidth) else (lambda: bandwidth)
    measured: dict[int, list[float]] = {n: [] for n in prompt_lengths}
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    _run_once(model, torch.randint(0, vocab, (min(prompt_lengths),), generator=gen).tolist(), min(gen_tokens, 8))
    stats: dict[int, list[GenerationStats]] = {n: [] for n in prompt_lengths}
    for r in range(repeat):
        for n in prompt_lengths:
            if progress:
                progress(f"run {r + 1}/{repeat}: {n} prompt tokens, {gen_tokens} generated")
            prompt = torch.randint(0, vocab, (n,), generator=gen).tolist()
            measured[n].append(probe())
            stats[n].append(_run_once(model, prompt, gen_tokens))
    runs = []
    for n in prompt_lengths:
        s = stats[n]
        ceilings = [bw / bytes_per_token for bw in measured[n]]
        runs.append(BenchRun(
            prompt_tokens=n, gen_tokens=gen_tokens, repeat=repeat,
            prefill_tps=Spread.of([x.prefill_tps for x in s]), decode_tps=Spread.of([x.decode_tps for x in s]),
            ttft_s=Spread.of([x.ttft_s for x in s]), ceiling_tps=Spread.of(ceilings),
            decode_fraction_of_ceiling=share_of_ceiling(s, measured[n], bytes_per_token),
        ))
    return runs, [bw for n in prompt_lengths for bw in measured[n]]


def _check_runs(prompt_lengths: Sequence[int], gen_tokens: int, repeat: int, context: int | None = None) -> None:
    """Usage errors in the run options; with the model's `context`, a run longer than it."""
    if context is not None and max(prompt_lengths) + gen_tokens > context:
        raise UsageError(f"{max(prompt_lengths) + gen_tokens} tokens exceed the model's context of {context}")
    if not prompt_lengths or min(prompt_lengths) < 1:
        raise UsageError("--prompt-tokens needs whole numbers >= 1")
    if gen_tokens < 2:
        raise UsageError("--gen-tokens must be at least 2 (the first token comes from prefill)")
    if repeat < 1:
        raise UsageError("--repeat must be at least 1")


def _random_model(cfg: Lfm2Config, label: str, device: torch.device, dtype: torch.dtype, **options: Any
                  ) -> Lfm2ForCausalLM:
    """`loader.random_model`, its allocation failures said as the tool's out-of-memory error."""
    from lfm2cli.loading import loader

    try:
        return loader.random_model(cfg, device, dtype, **options)
    except (MemoryError, RuntimeError) as e:
        raise _out_of_memory(e, label) from None


def bench(name: str | None, *, random_weights: bool = False, prompt_lengths: Sequence[int] = (128, 512),
          gen_tokens: int = 64, repeat: int = 3, device: str = "auto", dtype: str = "auto",
          quantize: str | None = None, compile: bool = False, offline: bool = False, pull: bool = False,
          force: bool = False,
          confirm: Callable[[str], bool] | None = None, progress: Callable[[str], None] | None = None,
          load_progress: Callable[[int, int], None] | None = None) -> BenchResult:
    """Build or load the model, measure bandwidth, run the prompts; returns everything the command prints.
    `progress` is told what is being done, `load_progress` the bytes of weights read or built so far."""
    from lfm2cli.kernels.quantize import check_mode
    from lfm2cli.loading import loader

    quantize = check_mode(quantize)
    _check_runs(prompt_lengths, gen_tokens, repeat)
    dev = loader.resolve_device(device)
    dt = loader.resolve_dtype(dtype, dev)
    loader.configure_threads(dev)
    say = progress or (lambda _msg: None)
    if random_weights:
        if name is None:
            raise UsageError("--random needs a model name, e.g. lfm2 bench --random lfm2-350m")
        cfg, label = random_config(name)
        if not force:  # before anything is measured or built
            check_fits(cfg, quantize, dt, dev)
    say("measuring memory bandwidth")
    bandwidth = measure_bandwidth(dev)
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    if random_weights:
        say(f"building {label} with random weights ({str(dt).removeprefix('torch.')})")
        model = _random_model(cfg, label, dev, dt, quantize=quantize, compile=compile, progress=load_progress)
        label += " (random weights)"
    else:
        from lfm2cli.hub.names import resolve_model

        path = resolve_model(name, offline=offline, pull=pull, confirm=confirm)
        say(f"loading {path}")
        cfg = load_config(path)
        if not force:
            check_fits(cfg, quantize, dt, dev)
        model = loader.load_model(path, cfg, dev, dt, quantize=quantize, compile=compile, progress=load_progress)
        label = str(path)
    load_s = time.perf_counter() - t0
    _check_runs(prompt_lengths, gen_tokens, repeat, cfg.max_position_embeddings)
    per_token = decode_bytes(model)
    runs, measured = run_bench(model, list(prompt_lengths), gen_tokens, repeat, per_token,
                               bandwidth_probe(model) or bandwidth, progress=progress)
    samples = [bandwidth, *measured]
    bandwidth = statistics.median(samples)
    total, active = parameter_counts(cfg)
    kernel, kernel_note = model.decode_plan.kernels()
    return BenchResult(
        model=label, architecture=cfg.architecture, parameters=total, active_parameters=active, device=str(dev),
        dtype=str(dt).removeprefix("torch."), quantize=quantize or "none", compile=compile,
        threads=torch.get_num_threads(), kernels=kernel, kernels_note=kernel_note, random_weights=random_weights,
        load_s=round(load_s, 3),
        memory_bandwidth_gbs=round(bandwidth / 1e9, 2),
        memory_bandwidth_range_gbs=(round(min(samples) / 1e9, 2), round(max(samples) / 1e9, 2)),
        decode_bytes_per_token=per_token, decode_ceiling_tps=round(bandwidth / per_token, 2),
        peak_memory_bytes=peak_memory(dev), runs=runs, skipped=model.decode_plan.skipped,
        plan=model.decode_plan.table(), tuning=_tuning(kernel),
    )


def _tuning(kernels: str) -> dict[str, Any] | None:
    """The native kernels' tuning when the model ran on them."""
    from lfm2cli.kernels import native

    return native.tuning_info() if kernels.startswith("native") else None


# ---- output ----

def _fmt(s: Spread, digits: int = 1, scale: float = 1.0) -> str:
    if not s.max > 0:  # rates over zero tokens or zero time: nothing was measured
        return "-"
    return f"{s.median * scale:.{digits}f} ({s.min * scale:.{digits}f}-{s.max * scale:.{digits}f})"


COLUMNS = ("prompt", "prefill tok/s", "decode tok/s", "first token ms", "of ceiling")


def rows(result: BenchResult) -> list[tuple[str, ...]]:
    return [(str(r.prompt_tokens), _fmt(r.prefill_tps), _fmt(r.decode_tps), _fmt(r.ttft_s, 0, 1000.0),
             f"{r.decode_fraction_of_ceiling:.0%}") for r in result.runs]


def _range(gbs: tuple[float, float]) -> str:
    """' (median; 38-45 measured)' when the bandwidth moved during the bench; else nothing."""
    low, high = gbs
    return f" (median; {low:.0f}-{high:.0f} measured)" if round(low) != round(high) else ""


def plan_report(result: BenchResult) -> list[str]:
    """The decode plan the model ran with, as plain lines under a title."""
    from lfm2cli.kernels.plan import plan_lines

    return ["decode plan (which code runs each part of the model here):", *plan_lines(result.plan)]


def summary(result: BenchResult) -> list[str]:
    from lfm2cli.kernels import tuning
    from lfm2cli.terminal.formatting import human_bytes, human_count

    params = human_count(result.parameters)
    if result.active_parameters != result.parameters:
        params += f" ({human_count(result.active_parameters)} active)"
    quant = "" if result.quantize == "none" else f", {result.quantize} weights"
    return [
        f"model: {result.model}, {result.architecture}, {params} parameters",
        f"device: {result.device}, {result.dtype}{quant}{', compiled' if result.compile else ''}, "
        f"{result.threads} threads, {result.kernels} kernels"
        f"{f' ({result.kernels_note})' if result.kernels_note else ''}; loaded in {result.load_s:.1f} s",
        f"memory bandwidth {result.memory_bandwidth_gbs:.1f} GB/s{_range(result.memory_bandwidth_range_gbs)}; "
        f"a decode step reads {human_bytes(result.decode_bytes_per_token)}; "
        f"ceiling {result.decode_ceiling_tps:.1f} tok/s",
        f"peak memory {human_bytes(result.peak_memory_bytes)}",
        *([f"native decode tuning: {tuning.describe(result.tuning)}"] if result.tuning else []),
        f"{result.runs[0].gen_tokens} tokens generated per run, {result.runs[0].repeat} runs each; "
        "median (min-max)" if result.runs else "",
    ]
