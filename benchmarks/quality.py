#!/usr/bin/env python3
"""Quality of lfm2's weight-only int8 and int4 next to llama.cpp's Q8_0 and Q4_0 (through the `gguf` package) on
the same weights: relative logit error and top-1 agreement against the bf16 model. Prints a markdown table;
`--write` puts it into docs/performance.md between the quality markers.

    python benchmarks/quality.py                          # LFM2-350M, 1.2B, 2.6B, 8B-A1B shapes
    python benchmarks/quality.py --models all --write     # every distinct published shape (the docs table)
    python benchmarks/quality.py --models lfm2-1.2b --layers full
    python benchmarks/quality.py --models lfm2-8b-a1b --layers 6 --tokens 32 --dists normal

For each published shape (lfm2cli.hub.known; names that share a shape are measured once) and each weight
distribution (normal, and Student-t with 3 degrees of freedom scaled to the same std, 1/sqrt(fan-in) as
`lfm2cli.loading.loader.random_model`
uses; norm weights 1, MoE routing biases 0), the weights are drawn once from a fixed
seed and rounded to bf16: the reference. Four copies then have every projection weight (each Linear's: attention
q/k/v/out, conv in/out, the feed-forward and expert w1/w2/w3) replaced by its quantise -> dequantise round trip in
one format: lfm2 int8 and int4 (`lfm2cli.kernels.quantize`,
given the bf16 weight as `--quantize` gives it), gguf Q8_0 and
Q4_0. Not quantised in any of them: the embedding table, which is also the (tied) output head, the conv filters,
the norms and the MoE router (`gate`, which lfm2 keeps in model precision). All five models run in float32 on the
same teacher-forced prompts (random token ids), so only the projection weights differ.

Big shapes take too long on a small CPU at full depth: by default a shape runs at full depth only if its
projections fit `--budget` (300 M weights: LFM2-350M, LFM2.5-230M), else its first 3 layers with the published
widths and layer types: conv, conv, attention; in the MoE shapes dense, dense, then sparse with attention. The
table says how many layers ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree, not whatever lfm2cli is installed

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lfm2cli.model.config import Lfm2Config, parse_config  # noqa: E402
from lfm2cli.model.lfm2 import Lfm2ForCausalLM  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
START, END = "<!-- quality:start -->", "<!-- quality:end -->"
FORMATS = ("int8", "Q8_0", "int4", "Q4_0")  # each of ours next to the GGUF format of (about) its size
PEER = {"int8": "Q8_0", "int4": "Q4_0"}
DISTRIBUTIONS = ("normal", "student-t3")
SEED = 0
PROMPTS = 4
TOKENS = 64
BUDGET = 300  # million projection weights per shape, by default (see `default_layers`)
DEFAULT_MODELS = ("LFM2-350M", "LFM2-1.2B", "LFM2-2.6B", "LFM2-8B-A1B")  # --models all: every published shape
THREADS = 1
WORSE = 1.01  # ours counts as worse than its GGUF peer above this ratio of mean logit errors (1 %: run-to-run noise)


# ---- shapes ----

def shape_key(cfg: Lfm2Config) -> tuple:
    """What the weights' seed hashes: the shape and structure of the model (see `shape_seed`)."""
    return (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.layer_types, cfg.dense_ff_dim, cfg.conv_L_cache,
            cfg.conv_bias, cfg.tie_word_embeddings, cfg.num_experts, cfg.num_experts_per_tok,
            cfg.moe_intermediate_size, cfg.num_dense_layers, cfg.use_expert_bias, cfg.norm_topk_prob,
            cfg.routed_scaling_factor)


def run_key(cfg: Lfm2Config) -> tuple:
    """What decides the numbers: two configs with the same key give the same table rows."""
    return (*shape_key(cfg), cfg.rope_theta, cfg.norm_eps)


def published_shapes(names: Iterable[str] | None = None) -> list[tuple[str, Lfm2Config, list[str]]]:
    """(name, config, other names of the same shape) per distinct shape: of `names` (aliases or repo ids), or of
    every model in lfm2cli.hub.known, in its order."""
    from lfm2cli.hub.known import KNOWN_CONFIGS, known_config
    from lfm2cli.hub.names import ALIASES

    if names is None:
        named = [(repo.split("/")[-1], parse_config(raw, source=repo)) for repo, raw in KNOWN_CONFIGS.items()]
    else:
        named = []
        for name in names:
            cfg = known_config(name)
            if cfg is None:
                raise SystemExit(f"unknown model {name!r}; known: {', '.join(r.split('/')[-1] for r in KNOWN_CONFIGS)}")
            repo = ALIASES.get(name.strip().lower()) or next(r for r in KNOWN_CONFIGS if r.lower() == name.lower())
            named.append((repo.split("/")[-1], cfg))
    shapes: dict[tuple, tuple[str, Lfm2Config, list[str]]] = {}
    for name, cfg in named:
        key = run_key(cfg)
        if key in shapes:
            shapes[key][2].append(name)
        else:
            shapes[key] = (name, cfg, [])
    return list(shapes.values())


def truncate(cfg: Lfm2Config, layers: int) -> Lfm2Config:
    """The first `layers` layers of a shape, widths and layer types as published."""
    layers = min(layers, cfg.num_hidden_layers)
    return dataclasses.replace(cfg, num_hidden_layers=layers, layer_types=cfg.layer_types[:layers])


def layer_weights(cfg: Lfm2Config, layer: int) -> int:
    """Projection weights (the quantised ones) of one layer."""
    h = cfg.hidden_size
    if cfg.is_attention(layer):
        q = cfg.num_attention_heads * cfg.head_dim
        op = 2 * h * q + 2 * h * cfg.num_key_value_heads * cfg.head_dim
    else:
        op = 4 * h * h  # in_proj (3h) and out_proj
    if cfg.is_moe_layer(layer):
        return op + cfg.num_experts * 3 * h * cfg.moe_intermediate_size
    return op + 3 * h * cfg.dense_ff_dim


def min_layers(cfg: Lfm2Config) -> int:
    """Enough layers to hold each kind the shape has: conv, attention and (MoE) a sparse layer."""
    need = 1
    if cfg.attention_layers:
        need = max(need, cfg.attention_layers[0] + 1)
    if any(t == "conv" for t in cfg.layer_types):
        need = max(need, cfg.layer_types.index("conv") + 1)
    if cfg.is_moe:
        need = max(need, cfg.num_dense_layers + 1)
    return min(need, cfg.num_hidden_layers)


def default_layers(cfg: Lfm2Config, budget: float) -> int:
    """Full depth when the shape's projection weights fit `budget` million, else `min_layers`: the first attention
    layer and, in MoE shapes, the first sparse one, with the layers before them."""
    total = sum(layer_weights(cfg, i) for i in range(cfg.num_hidden_layers))
    return cfg.num_hidden_layers if total <= budget * 1e6 else min_layers(cfg)


# ---- weights ----

def sample(shape: tuple[int, ...], dist: str, gen: torch.Generator) -> torch.Tensor:
    """float32 values of unit variance: standard normal, or Student-t with 3 degrees of freedom, z / sqrt(c / 3)
    with c chi-squared of 3 degrees (-2 ln u + y^2, u uniform in (0, 1], y normal), divided by its std sqrt(3)."""
    z = torch.randn(shape, generator=gen)
    if dist == "normal":
        return z
    if dist == "student-t3":
        u = torch.rand(shape, generator=gen).neg_().add_(1)
        c = torch.randn(shape, generator=gen).square_().sub_(u.log_().mul_(2))
        return z.div_(c.div_(3).sqrt_()).div_(3 ** 0.5)
    raise ValueError(f"unknown distribution {dist!r}")


def is_projection(name: str, module: nn.Module) -> bool:
    """The weights lfm2 quantises: every Linear but the MoE router."""
    return isinstance(module, nn.Linear) and not name.endswith(".gate")


def build_model(cfg: Lfm2Config, dist: str, seed: int) -> tuple[Lfm2ForCausalLM, dict[str, torch.Tensor]]:
    """A float32 model holding bf16-rounded random weights, and the bf16 projection weights by module name."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Lfm2ForCausalLM(cfg)
    model = model.to_empty(device="cpu").float().eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("expert_bias"):
                p.zero_()
            elif p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(sample(tuple(p.shape), dist, gen).div_(fan_in ** 0.5).bfloat16())
    originals = {name: m.weight.detach().bfloat16() for name, m in model.named_modules() if is_projection(name, m)}
    return model, originals


# ---- the four formats: bf16 weight -> (float32 weight as the format stores it, storage bits) ----

def ours_int8(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    from lfm2cli.kernels.quantize import dequantize_int8, quantize_int8

    q, scales = quantize_int8(w)
    return dequantize_int8(q, scales), 8 * (q.nbytes + scales.nbytes)


def ours_int4(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    from lfm2cli.kernels.quantize import dequantize_int4, quantize_int4

    nibbles, scales = quantize_int4(w)
    return dequantize_int4(nibbles, scales).float(), 8 * (nibbles.nbytes + scales.nbytes)


def gguf_format(qtype_name: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, int]]:
    def roundtrip(w: torch.Tensor) -> tuple[torch.Tensor, int]:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quantize

        qtype = GGMLQuantizationType[qtype_name]
        data = quantize(w.float().numpy(), qtype)
        return torch.from_numpy(dequantize(data, qtype)).reshape(w.shape), 8 * data.nbytes

    return roundtrip


ROUNDTRIP: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, int]]] = {
    "int8": ours_int8, "int4": ours_int4, "Q8_0": gguf_format("Q8_0"), "Q4_0": gguf_format("Q4_0"),
}


def bits_per_weight(fmt: str, shapes: Iterable[tuple[int, int]]) -> float:
    """Storage bits per projection weight of a format over weights of these [out, in] shapes (by the format's own
    sizes: int8 and int4 a bf16 scale per 32; Q8_0/Q4_0 per gguf's block sizes)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from lfm2cli.kernels.quantize import GROUP

    bits = count = 0
    for out, inn in shapes:
        count += out * inn
        if fmt in ("int8", "int4"):
            bits += out * inn * (8 if fmt == "int8" else 4) + out * (inn // GROUP) * 16
        else:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType[fmt]]
            bits += out * (inn // block) * size * 8
    return bits / count


def set_weights(model: nn.Module, originals: dict[str, torch.Tensor], fmt: str | None) -> tuple[float, int]:
    """Put each projection weight back as its bf16 original (fmt None) or its round trip through `fmt`.
    Returns the relative RMS error of the weights and the bits stored."""
    err = ref = 0.0
    bits = 0
    with torch.no_grad():
        for name, w in originals.items():
            param = model.get_submodule(name).weight
            if fmt is None:
                param.copy_(w)
                continue
            deq, b = ROUNDTRIP[fmt](w)
            param.copy_(deq)
            wf = w.float()
            err += float(torch.dist(deq, wf)) ** 2
            ref += float(torch.linalg.vector_norm(wf)) ** 2
            bits += b
    return (err / ref) ** 0.5 if ref else 0.0, bits


# ---- running and comparing ----

def prompts(vocab: int, count: int, tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, tokens), generator=gen)


def all_logits(model: Lfm2ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced float32 logits of every position of every prompt: [prompts * tokens, vocab]."""
    return torch.cat([model(row[None], all_logits=True)[0] for row in ids])


@dataclass
class Scores:
    mean_err: float  # mean over positions of ||logits_q - logits_ref|| / ||logits_ref||
    max_err: float
    top1: float  # share of positions whose argmax matches the reference's


def compare(ref: torch.Tensor, out: torch.Tensor) -> Scores:
    rel = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean()
    return Scores(float(rel.mean()), float(rel.max()), float(top1))


@dataclass
class Row:
    shape: str
    layers: str  # "16 of 16"
    dist: str
    fmt: str
    bits: float
    weight_err: float
    scores: Scores


def measure(cfg: Lfm2Config, dist: str, ids: torch.Tensor, seed: int, formats: Iterable[str] = FORMATS,
            log: Callable[[str], None] = lambda s: None) -> dict[str, tuple[float, float, Scores]]:
    """{format: (bits per weight, relative RMS weight error, scores against bf16)} for one shape and distribution."""
    t0 = time.perf_counter()
    model, originals = build_model(cfg, dist, seed)
    ref = all_logits(model, ids)
    log(f"    built and ran bf16 in {time.perf_counter() - t0:.1f} s")
    results = {}
    for fmt in formats:
        t = time.perf_counter()
        weight_err, bits = set_weights(model, originals, fmt)
        t_q = time.perf_counter() - t
        scores = compare(ref, all_logits(model, ids))
        count = sum(w.numel() for w in originals.values())
        results[fmt] = (bits / count, weight_err, scores)
        log(f"    {fmt}: quantised in {t_q:.1f} s, ran in {time.perf_counter() - t - t_q:.1f} s; logit error "
            f"{scores.mean_err:.4f} (max {scores.max_err:.4f}), top-1 {scores.top1:.1%}")
    return results


def shape_seed(cfg: Lfm2Config, dist: str, seed: int) -> int:
    """The weights' seed: one per published shape (however it is named) and distribution. The weights are drawn
    embedding first, then layer by layer, so a shape's first layers are the same whatever --layers says."""
    return zlib.crc32(f"{shape_key(cfg)}/{dist}/{seed}".encode())


# ---- the report ----

def table(rows: list[Row]) -> str:
    lines = ["| shape | layers | distribution | format | bits/weight | weight RMS err | logit err mean | logit err max "
             "| top-1 agree | ours / GGUF (mean err) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    by_key = {(r.shape, r.dist, r.fmt): r for r in rows}
    for r in rows:
        ratio = ""
        if r.fmt in PEER and (peer := by_key.get((r.shape, r.dist, PEER[r.fmt]))) and peer.scores.mean_err > 0:
            ratio = f"{r.scores.mean_err / peer.scores.mean_err:.3f}x"
        s = r.scores
        lines.append(f"| {r.shape} | {r.layers} | {r.dist} | {r.fmt} | {r.bits:.3f} | {r.weight_err:.2%} "
                     f"| {s.mean_err:.2%} | {s.max_err:.2%} | {s.top1:.1%} | {ratio} |")
    return "\n".join(lines)


def ratios(rows: list[Row]) -> dict[str, list[tuple[float, Row]]]:
    """Per format of ours: (its mean logit error / its GGUF peer's, its row) wherever both ran."""
    by_key = {(r.shape, r.dist, r.fmt): r for r in rows}
    out: dict[str, list[tuple[float, Row]]] = {}
    for r in rows:
        peer = by_key.get((r.shape, r.dist, PEER.get(r.fmt, "")))
        if peer and peer.scores.mean_err > 0:
            out.setdefault(r.fmt, []).append((r.scores.mean_err / peer.scores.mean_err, r))
    return out


def summary(rows: list[Row], tolerance: float = WORSE) -> list[str]:
    """One line per format of ours: no worse than its GGUF peer everywhere, or where and by how much it is."""
    lines = []
    by_key = {(r.shape, r.dist, r.fmt): r for r in rows}
    for fmt, pairs in ratios(rows).items():
        lo, hi = min(x for x, _ in pairs), max(x for x, _ in pairs)
        weight = [r.weight_err / by_key[(r.shape, r.dist, PEER[fmt])].weight_err for _, r in pairs]
        span = (f"{lo:.3f}x to {hi:.3f}x {PEER[fmt]}'s mean logit error (weight error {min(weight):.3f}x to "
                f"{max(weight):.3f}x)")
        worse = [(x, r) for x, r in pairs if x > tolerance]
        if not worse:
            lines.append(f"{fmt} against {PEER[fmt]}: no worse anywhere (within {tolerance - 1:.0%}): {span}.")
        elif len(worse) == len(pairs):
            lines.append(f"{fmt} against {PEER[fmt]}: **worse everywhere**, {span}.")
        else:
            where = ", ".join(f"{r.shape} {r.dist} ({x:.2f}x)" for x, r in worse)
            lines.append(f"{fmt} against {PEER[fmt]}: **worse** in {where}; overall {span}.")
    return lines


def write_doc(text: str, doc: Path = DOC) -> None:
    """Replace what is between the quality markers in `doc` (read and written in one go: others edit it too)."""
    current = doc.read_text(encoding="utf-8")
    if START not in current or END not in current:
        raise SystemExit(f"{doc}: no {START} ... {END} markers; add them where the table belongs")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    doc.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", current, count=1), encoding="utf-8")


def parse_layers(value: str) -> int | None:
    if value in ("auto", "full"):
        return None if value == "auto" else 10 ** 6
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("--layers needs a positive count, 'auto' or 'full'")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help="comma-separated aliases or repo ids, or 'all': every distinct published shape "
                         f"(default {','.join(DEFAULT_MODELS)})")
    ap.add_argument("--layers", default="auto",
                    help="leading layers per shape: a count, 'full', or 'auto': full depth where the shape's "
                         "projections fit --budget, else the fewest that hold each kind of layer (3)")
    ap.add_argument("--budget", type=float, default=BUDGET,
                    help=f"with --layers auto: million projection weights of a full-depth shape (default {BUDGET})")
    ap.add_argument("--tokens", type=int, default=TOKENS, help=f"tokens per prompt (default {TOKENS})")
    ap.add_argument("--prompts", type=int, default=PROMPTS, help=f"random prompts (default {PROMPTS})")
    ap.add_argument("--dists", default=",".join(DISTRIBUTIONS), help="weight distributions: normal, student-t3")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=THREADS,
                    help=f"torch threads (default {THREADS}: on a shared 2-core machine, 2 ran at half the speed; "
                         "the results do not depend on it)")
    ap.add_argument("--write", action="store_true", help=f"put the table into {DOC.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    layers_arg = parse_layers(args.layers)
    names = None if args.models == "all" else [n.strip() for n in args.models.split(",") if n.strip()]
    dists = [d.strip() for d in args.dists.split(",") if d.strip()]

    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    rows: list[Row] = []
    notes: list[str] = []
    for name, full_cfg, same in published_shapes(names):
        n = layers_arg if layers_arg is not None else default_layers(full_cfg, args.budget)
        cfg = truncate(full_cfg, n)
        layers = f"{cfg.num_hidden_layers} of {full_cfg.num_hidden_layers}"
        weights = sum(layer_weights(cfg, i) for i in range(cfg.num_hidden_layers))
        if same:
            notes.append(f"{', '.join(same)} as {name}")
        ids = prompts(cfg.vocab_size, args.prompts, args.tokens, args.seed)
        shapes = [tuple(m.weight.shape) for m in _meta_projections(cfg)]
        for dist in dists:
            log(f"{name}, {layers} layers ({weights / 1e6:.0f} M projection weights), {dist} weights")
            results = measure(cfg, dist, ids, shape_seed(full_cfg, dist, args.seed), log=log)
            for fmt, (_, werr, scores) in results.items():
                rows.append(Row(name, layers, dist, fmt, bits_per_weight(fmt, shapes), werr, scores))
    elapsed = time.perf_counter() - start

    command = "python benchmarks/quality.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])
                                                        if a != "--write")
    threads = torch.get_num_threads()
    out = [table(rows), "",
           f"`{command}`: {args.prompts} random prompts of {args.tokens} tokens, teacher-forced, seed {args.seed}, "
           f"float32 compute, {threads} thread{'s' * (threads > 1)}: {elapsed / 60:.1f} min. Layers, with the "
           "published widths and layer types: "
           + ("the first --layers" if layers_arg is not None else
              f"all where a shape's projections fit {args.budget:g} M weights, else the fewest leading ones that "
              "hold each kind (conv, conv, attention; MoE: dense, dense, sparse with attention)") + "."]
    if notes:
        out.append("Same shape, same rows: " + "; ".join(notes) + ".")
    out += summary(rows)
    text = "\n".join(out)
    print(text)
    if args.write:
        write_doc(text)
        log(f"wrote {DOC.relative_to(ROOT)}")
    return 0


def _meta_projections(cfg: Lfm2Config) -> list[nn.Linear]:
    with torch.device("meta"):
        model = Lfm2ForCausalLM(cfg)
    return [m for name, m in model.named_modules() if is_projection(name, m)]


if __name__ == "__main__":
    raise SystemExit(main())
