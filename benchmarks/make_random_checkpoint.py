#!/usr/bin/env python3
"""Write a published LFM2 model's shape with random bf16 weights as a Hugging Face checkpoint (config.json,
model.safetensors and a byte-level BPE tokenizer), for side-by-side speed runs where both engines must read the
same files: `lfm2 serve DIR` on one side, the GGUF that `benchmarks/peers/setup` and `benchmarks/gguf_vocab.py`
make of it on the other.

    python benchmarks/make_random_checkpoint.py OUT_DIR                  # LFM2-350M's shape
    python benchmarks/make_random_checkpoint.py OUT_DIR --model lfm2-700m

Name OUT_DIR after the model (e.g. /tmp/LFM2-350M) so `benchmarks/compare.py --llama-cpp` finds its GGUF files.
Speed does not depend on the values, so the weights are random (std 1/sqrt(fan-in), norms one) and the tokenizer
is trained on random pseudo-words: its merges only have to exist. It is trained up to the config's vocab_size;
ids it does not reach are rows of the embedding that no text encodes to, as in the published checkpoints.
With random weights a greedy reply almost never meets EOS (1 id of 65,536), so replies run to max_tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree, not whatever lfm2cli is installed
sys.path.insert(0, str(ROOT / "tests"))

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwxyz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ea")]


def pseudo_words(count: int, seed: int) -> list[str]:
    """Lines of random words built from syllables: enough distinct pairs for tens of thousands of merges."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(count)]
    return [" ".join(words[i:i + 12]) for i in range(0, count, 12)]


def write_tokenizer(out: Path, vocab_size: int, seed: int) -> int:
    """A byte-level BPE laid out like LFM2's (its 14 control tokens first, BOS prepended), trained towards
    `vocab_size` entries; its config files and chat template are the test suite's tiny tokenizer's. Returns the
    number of entries it reached."""
    from tiny_tokenizer import BOS, SPECIAL_TOKENS, make_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    make_tokenizer(out)  # tokenizer_config.json, special_tokens_map.json, the chat template
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pseudo_words(400_000, seed), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))])
    tok.save(str(out / "tokenizer.json"))
    return tok.get_vocab_size()


def write_weights(out: Path, raw: dict, seed: int) -> int:
    """Random bf16 tensors under the names and shapes `transformers` saves for this config; their count."""
    import torch
    from safetensors.torch import save_file
    from transformers import Lfm2Config, Lfm2ForCausalLM

    with torch.device("meta"):
        names = {k: p.shape for k, p in Lfm2ForCausalLM(Lfm2Config(**raw)).state_dict().items()}
    if raw.get("tie_embedding", raw.get("tie_word_embeddings", True)):
        names.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in names.items():
        if len(shape) == 1 and "norm" in name:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.randn(shape, generator=gen)
            tensors[name] = t.mul_(1.0 / shape[-1] ** 0.5).to(torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="LiquidAI/LFM2-350M", help="a dense published model's repo id")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from lfm2cli.hub.known import KNOWN_CONFIGS
    from lfm2cli.hub.names import ALIASES

    repo = ALIASES.get(args.model.lower(), args.model)
    raw = KNOWN_CONFIGS.get(repo)
    if raw is None or raw["model_type"] != "lfm2":
        raise SystemExit(f"{args.model}: not a dense model of lfm2cli.hub.known ({', '.join(KNOWN_CONFIGS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(raw, indent=2))
    params = write_weights(args.out, raw, args.seed)
    entries = write_tokenizer(args.out, raw["vocab_size"], args.seed)
    print(f"wrote {args.out}: {repo}'s shape, {params / 1e6:.0f}M random bf16 parameters, a tokenizer of "
          f"{entries} entries (vocab_size {raw['vocab_size']})")


if __name__ == "__main__":
    main()
