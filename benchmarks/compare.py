#!/usr/bin/env python3
"""lfm2 against transformers on the same model shape, in one run, interleaved; plus cold start, `--help` time and
int8 vs bf16. Prints a markdown table; `--write` puts it into docs/performance.md.

    python benchmarks/compare.py                       # LFM2-350M shape, 3 repetitions
    python benchmarks/compare.py --model lfm2-1.2b --write
    python benchmarks/compare.py --torch-kernels      # also lfm2 without its native code (what it buys)
    python benchmarks/compare.py --model lfm2-8b-a1b --repeat 1 --no-compile   # sequential: two 16.7 GB models
                                                                                 # do not fit in memory at once

Both engines get random bf16 weights of the published shape (speed does not depend on the values), the same
random prompts, greedy decoding and a fixed number of new tokens (transformers: min_new_tokens = max_new_tokens,
so EOS cannot cut a run short). Each repetition runs every engine on every prompt length in turn, so a busy
moment on a shared machine spreads over all of them; the table shows medians. Needs transformers installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree, not whatever lfm2cli is installed

import torch  # noqa: E402

from lfm2cli.benchmark import BANDWIDTH_BYTES, decode_bytes, measure_bandwidth, share_of_ceiling  # noqa: E402
from lfm2cli.decoding.loop import GenerationStats, decode_tokens  # noqa: E402
from lfm2cli.hub.known import KNOWN_CONFIGS, known_config  # noqa: E402
from lfm2cli.loading import loader  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
CPU = torch.device("cpu")


@dataclass
class Engine:
    name: str
    run: Callable[[list[int], int], GenerationStats]  # (prompt ids, new tokens) -> stats
    decode_bytes: int = 0
    results: dict[int, list[GenerationStats]] = field(default_factory=dict)
    bandwidth: dict[int, list[float]] = field(default_factory=dict)  # measured just before each of its runs


# ---- the two engines ----

def lfm2_engine(name: str, cfg, quantize: str | None = None, compile: bool = False, native: bool = True,
                compiled_tuning: bool = False) -> Engine:
    """`compiled_tuning`: its runs use the native kernels' compiled defaults, not the tuning chosen at load."""
    model = loader.random_model(cfg, CPU, torch.bfloat16, quantize=quantize, compile=compile, native=native)

    def run(prompt: list[int], new: int) -> GenerationStats:
        if compiled_tuning:
            from lfm2cli.kernels import native as lib
            from lfm2cli.kernels import tuning

            chosen = lib.tuning_info()
            lib.set_tuning(None)
            try:
                return generate(prompt, new)
            finally:
                lib.set_tuning({k: chosen[k] for k in tuning.FIELDS}, str(chosen["source"]))
        return generate(prompt, new)

    def generate(prompt: list[int], new: int) -> GenerationStats:
        stats = GenerationStats()
        cache = model.new_cache(capacity=len(prompt) + new)
        for _ in decode_tokens(model, prompt, sampler=lambda logits, _seen: int(logits.argmax()), max_tokens=new,
                          cache=cache, stats=stats):
            pass
        return stats

    return Engine(name, run, decode_bytes(model))


class _Clock:
    """A transformers streamer that notes when each new token arrives (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def transformers_engine(repo: str) -> Engine:
    import transformers

    raw = dict(KNOWN_CONFIGS[repo])
    cls = transformers.Lfm2MoeForCausalLM if raw["model_type"] == "lfm2_moe" else transformers.Lfm2ForCausalLM
    cfg_cls = transformers.Lfm2MoeConfig if raw["model_type"] == "lfm2_moe" else transformers.Lfm2Config
    config = cfg_cls(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    model = cls._from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None

    def run(prompt: list[int], new: int) -> GenerationStats:
        clock = _Clock()
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=0, streamer=clock)
        stamps = clock.times[1:]  # one per generated token
        first = stamps[0] - t0
        return GenerationStats(prompt_tokens=len(prompt), generated_tokens=len(stamps), ttft_s=first,
                               prefill_s=first, decode_s=stamps[-1] - stamps[0])

    return Engine(f"transformers {transformers.__version__}", run, 0)


def llama_cpp_engine(peers: Path, gguf: Path, context: int) -> Engine:
    """llama.cpp on a GGUF, in the peers venv's Python (a worker process answering one request per run)."""
    worker = subprocess.Popen([str(peers / "venv" / "bin" / "python"), str(ROOT / "benchmarks" / "llama_cpp_worker.py"),
                               str(gguf), str(context), str(torch.get_num_threads())],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    hello = json.loads(worker.stdout.readline() or "{}")
    if not hello.get("ready"):
        raise RuntimeError(f"llama.cpp worker for {gguf} did not start")
    kind = gguf.stem.rsplit("-", 1)[-1]

    def run(prompt: list[int], new: int) -> GenerationStats:
        worker.stdin.write(json.dumps({"prompt": prompt, "new": new}) + "\n")
        worker.stdin.flush()
        t = json.loads(worker.stdout.readline())
        return GenerationStats(prompt_tokens=len(prompt), generated_tokens=new, ttft_s=t["prefill_s"],
                               prefill_s=t["prefill_s"], decode_s=t["decode_s"])

    isa = "AVX512" if "AVX512 = 1" in hello["system"] else "AVX2" if "AVX2 = 1" in hello["system"] else "?"
    return Engine(f"llama.cpp {kind} ({isa} build)", run, 0)


# ---- process-level timings ----

def _median_time(cmd: list[str], n: int, **kw) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True, cwd=ROOT, **kw)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _first_output(cmd: list[str]) -> float:
    """Seconds from process start to the first byte it writes on stdout (the first streamed token)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.read(1)
    first = time.perf_counter() - t
    proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return first


def write_checkpoint(path: Path, repo: str) -> None:
    """A random checkpoint of the published shape (bf16 safetensors) with a synthetic 65536-word tokenizer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = known_config(repo)
    model = loader.random_model(cfg, CPU, torch.bfloat16, fast=False)
    tensors = {n: t.contiguous() for n, t in model.state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(KNOWN_CONFIGS[repo], indent=2))
    special = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
               "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(special + [f"w{i}" for i in range(len(special), cfg.vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(special)
    tok.save(str(path / "tokenizer.json"))
    template = ("{{- bos_token -}}{%- for m in messages -%}{{- '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] "
                "~ '<|im_end|>\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}"
                "{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
        "chat_template": template}))


def process_timings(repeat: int) -> dict[str, float]:
    """Wall times of whole processes; `import torch` and `lfm2 generate` alternate, and the cold-start cost is
    the median of the per-pair differences (the shared machine's load shifts both alike)."""
    py = sys.executable
    out = {"lfm2 --help": _median_time([py, "-m", "lfm2cli", "--help"], repeat)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "lfm2-350m-random"
        write_checkpoint(ckpt, "LiquidAI/LFM2-350M")
        cmd = [py, "-m", "lfm2cli", "generate", str(ckpt), "--prompt", "w20 w21 w22", "-n", "4",
               "--temperature", "0"]
        _first_output(cmd)  # once to warm the page cache: we time starting a process, not the disk
        torch_s, first_s = [], []
        for _ in range(repeat):
            torch_s.append(_median_time([py, "-c", "import torch"], 1))
            first_s.append(_first_output(cmd))
        out["import torch"] = statistics.median(torch_s)
        out["lfm2 generate: start to first token"] = statistics.median(first_s)
        out["cold start minus import torch"] = statistics.median(f - t for f, t in zip(first_s, torch_s, strict=True))
    return out


# ---- the comparison ----

def machine() -> str:
    from lfm2cli.kernels import native
    from lfm2cli.system import cpu

    level = native.level() or os.environ.get("LFM2_NATIVE_ISA") or (cpu.native_level()[0] or "none")
    return (f"{cpu.model_name()} ({cpu.describe()}), {cpu.physical_cores()} cores, {torch.get_num_threads()} "
            f"threads, lfm2 native level {level}, torch {torch.__version__}, Python {platform.python_version()}, "
            f"{datetime.date.today().isoformat()}")


def run_all(engines: list[Engine], lengths: list[int], new: int, repeat: int, vocab: int) -> list[float]:
    """Runs every engine on every length, `repeat` times interleaved, measuring the memory bandwidth just before
    each run: the host's bandwidth moves by up to 1.7x from minute to minute here, so each run is set against
    its own ceiling. Returns every bandwidth measured."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.ones(BANDWIDTH_BYTES // 2, dtype=torch.bfloat16)  # one buffer for every measurement
    for e in engines:  # warm-up (and, for compiled engines, compilation)
        e.run(torch.randint(0, vocab, (16,), generator=gen).tolist(), 4)
        e.results = {n: [] for n in lengths}
        e.bandwidth = {n: [] for n in lengths}
    for r in range(repeat):
        for n in lengths:
            prompt = torch.randint(0, vocab, (n,), generator=gen).tolist()
            for e in engines:
                print(f"  run {r + 1}/{repeat}, {n} tokens: {e.name}", file=sys.stderr, flush=True)
                e.bandwidth[n].append(measure_bandwidth(CPU, repeat=2, buf=probe))
                e.results[n].append(e.run(prompt, new))
    return [bw for e in engines for n in lengths for bw in e.bandwidth[n]]


def med(values: list[float]) -> float:
    return statistics.median(values)


def table(engines: list[Engine], lengths: list[int], base: Engine | None) -> list[str]:
    head = ["engine"] + [f"prefill {n} tok/s" for n in lengths] + ["decode tok/s", f"TTFT {lengths[0]} ms",
                                                                     "decode / ceiling"]
    if base is not None:
        head += ["decode vs transformers", f"prefill {lengths[-1]} vs transformers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def decode(e: Engine) -> float:
        return med([s.decode_tps for n in lengths for s in e.results[n]])

    for e in engines:
        cells = [e.name] + [f"{med([s.prefill_tps for s in e.results[n]]):.0f}" for n in lengths]
        cells.append(f"{decode(e):.1f}")
        cells.append(f"{med([s.ttft_s for s in e.results[lengths[0]]]) * 1000:.0f}")
        runs = [s for n in lengths for s in e.results[n]]
        bandwidths = [bw for n in lengths for bw in e.bandwidth[n]]
        cells.append(f"{share_of_ceiling(runs, bandwidths, e.decode_bytes):.0%}" if e.decode_bytes else "")
        if base is not None:
            last = lengths[-1]
            cells.append(f"{decode(e) / decode(base):.2f}x")
            prefill = med([s.prefill_tps for s in e.results[last]])
            cells.append(f"{prefill / med([s.prefill_tps for s in base.results[last]]):.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def peer_table(ours: list[Engine], peers: list[Engine], lengths: list[int]) -> list[str]:
    """Each lfm2 engine's decode and prefill speed as a ratio of each llama.cpp engine's, from the same runs."""
    def decode(e: Engine) -> float:
        return med([s.decode_tps for n in lengths for s in e.results[n]])

    def prefill(e: Engine, n: int) -> float:
        return med([s.prefill_tps for s in e.results[n]])

    head = ["lfm2 engine"] + [f"decode vs {p.name}" for p in peers] + \
        [f"prefill {n} vs {p.name}" for n in lengths for p in peers[:1]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in ours:
        cells = [e.name] + [f"{decode(e) / decode(p):.2f}x" for p in peers]
        cells += [f"{prefill(e, n) / prefill(p, n):.2f}x" for n in lengths for p in peers[:1]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_doc(block: str, key: str) -> None:
    start, end = f"<!-- compare:{key} start -->", f"<!-- compare:{key} end -->"
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    new = f"{start}\n{block.rstrip()}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _m: new, text, flags=re.S)
    else:
        marker = "<!-- compare results -->"
        text = text.replace(marker, marker + "\n\n" + new) if marker in text else text.rstrip() + "\n\n" + new + "\n"
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lfm2-350m", help="lfm2-350m, lfm2-1.2b, lfm2-8b-a1b, ...")
    ap.add_argument("--prompt-tokens", default="128,512")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true", help="lfm2 only")
    ap.add_argument("--no-compile", action="store_true", help="skip the --compile variants")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 variants")
    ap.add_argument("--no-int4", action="store_true", help="skip the int4 variant")
    ap.add_argument("--torch-kernels", action="store_true", help="add lfm2 bf16 without its native code")
    ap.add_argument("--no-process", action="store_true", help="skip cold start and --help timings")
    ap.add_argument("--llama-cpp", type=Path, metavar="DIR",
                    help="also run llama.cpp: the folder benchmarks/peers/setup wrote (venv/ and MODEL-KIND.gguf)")
    ap.add_argument("--llama-kinds", default="bf16,q8_0", help="which GGUFs of --llama-cpp to run")
    ap.add_argument("--compiled-tuning", action="store_true",
                    help="add each native variant with the kernels' compiled defaults, not the tuned choice")
    ap.add_argument("--native-isa", choices=["avx512", "avx2"], help="lfm2's native kernels at this level")
    ap.add_argument("--write", action="store_true", help=f"update {DOC.relative_to(ROOT)}")
    args = ap.parse_args()
    if args.native_isa:
        os.environ["LFM2_NATIVE_ISA"] = args.native_isa
    lengths = [int(x) for x in args.prompt_tokens.split(",")]
    from lfm2cli.hub.names import ALIASES

    repo = ALIASES.get(args.model.lower(), args.model)
    if repo not in KNOWN_CONFIGS:
        sys.exit(f"unknown model {args.model!r}; use one of lfm2-350m, lfm2-700m, lfm2-1.2b, lfm2-2.6b, lfm2-8b-a1b")
    cfg = known_config(repo)
    loader.configure_threads(CPU)
    print(f"machine: {machine()}", file=sys.stderr)
    bandwidths: list[float] = []
    big = cfg.is_moe  # two 8B models do not fit next to each other: run the engines one after the other
    variants: list[tuple[str, dict]] = [("lfm2 bf16", {})]
    if args.torch_kernels:
        variants.append(("lfm2 bf16, torch kernels", {"native": False}))
    if not args.no_compile and not cfg.is_moe:
        # where the native code runs, lfm2 ignores --compile: measure it as a CPU without that code runs it
        variants.append(("lfm2 bf16 --compile, torch kernels", {"compile": True, "native": False}))
    if not args.no_int8:
        variants.append(("lfm2 int8", {"quantize": "int8"}))
        if not args.no_compile and not cfg.is_moe:
            variants.append(("lfm2 int8 --compile, torch kernels",
                             {"quantize": "int8", "compile": True, "native": False}))
    if not args.no_int4:
        variants.append(("lfm2 int4", {"quantize": "int4"}))
    if args.compiled_tuning:
        variants += [(f"{n}, compiled tuning", {**kw, "compiled_tuning": True}) for n, kw in variants
                     if kw.get("native", True)]
    builders: list[Callable[[], Engine]] = [lambda n=n, kw=kw: lfm2_engine(n, cfg, **kw) for n, kw in variants]
    if not args.no_transformers:
        builders.insert(0, lambda: transformers_engine(repo))
    if args.llama_cpp:
        context = max(lengths) + args.gen_tokens + 8
        for kind in args.llama_kinds.split(","):
            gguf = args.llama_cpp / f"{repo.split('/')[1]}-{kind}.gguf"
            if not gguf.is_file():
                sys.exit(f"{gguf} is missing: run benchmarks/peers/setup on a checkpoint of this shape first")
            builders.append(lambda g=gguf: llama_cpp_engine(args.llama_cpp, g, context))
    engines: list[Engine] = []
    if big:
        for build in builders:
            e = build()
            bandwidths += run_all([e], lengths, args.gen_tokens, args.repeat, cfg.vocab_size)
            e.run = None  # drop the model before the next one is built
            engines.append(e)
            import gc

            gc.collect()
    else:
        engines = [build() for build in builders]
        bandwidths = run_all(engines, lengths, args.gen_tokens, args.repeat, cfg.vocab_size)
    bandwidth = med(bandwidths)
    base = engines[0] if not args.no_transformers else None
    from lfm2cli.kernels import native, tuning

    print(f"native decode tuning: {tuning.describe(native.tuning_info())}", file=sys.stderr)
    from lfm2cli.system import cpu

    lines = [f"### {repo.split('/')[1]} shape, bf16 weights (random), batch 1: {cpu.describe()} CPU, lfm2's "
             f"{native.level() or 'torch'} kernels", "",
             f"Machine: {machine()}. Memory read bandwidth, measured before each of the {len(bandwidths)} runs: "
             f"median {bandwidth / 1e9:.1f} GB/s (range {min(bandwidths) / 1e9:.0f}-{max(bandwidths) / 1e9:.0f}). "
             f"{args.gen_tokens} new tokens per run, {args.repeat} repetitions "
             f"{'one engine after the other (two models do not fit in memory together)' if big else 'interleaved'}"
             f"; medians. Decode / ceiling: each run's decode speed over bandwidth / bytes a decode step reads "
             f"(bf16: {next(e for e in engines if e.decode_bytes).decode_bytes / 1e6:.0f} MB; int8 about 0.53x, "
             f"int4 0.28x), "
             f"with the bandwidth measured just before that run.",
             "", *table(engines, lengths, base)]
    peers = [e for e in engines if e.name.startswith("llama.cpp")]
    if peers:
        lines += ["", *peer_table([e for e in engines if e.name.startswith("lfm2")], peers, lengths)]
    if not args.no_process:
        timings = process_timings(max(5, args.repeat))
        lines += ["", "| process | wall time (median) |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} s |" for k, v in timings.items()]
        lines += ["", "Cold start: `lfm2 generate` on an LFM2-350M-shaped random bf16 checkpoint (warm page cache, a "
                      "synthetic 65536-word tokenizer), from process start to the first byte on stdout; each run "
                      "paired with a `python -c \"import torch\"` run."]
    lines += ["", f"Command: `python benchmarks/compare.py {' '.join(sys.argv[1:])}`"]
    block = "\n".join(lines)
    print(block)
    if args.write:
        from lfm2cli.kernels import native

        # one table per model and native level: an AVX2 run does not overwrite the AVX512 one
        write_doc(block, f"{repo.split('/')[1].lower()}-{native.level() or 'torch'}")
        print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
