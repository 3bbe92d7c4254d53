#!/usr/bin/env python3
"""llama.cpp's prefill (one batch of N prompt tokens) and decode (one token at a time) speed on a GGUF of token ids
only (no vocabulary), best of 3. Runs in the venv `setup` makes.

    VENV/bin/python llama_bench.py MODEL.gguf [PROMPT_TOKENS=128] [DECODE_TOKENS=64] [THREADS=2]
"""

from __future__ import annotations

import sys
import time

from llama_cpp import Llama


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    path = sys.argv[1]
    n_prompt, n_decode, threads = (int(sys.argv[i]) if len(sys.argv) > i else d for i, d in ((2, 128), (3, 64), (4, 2)))
    llm = Llama(model_path=path, n_ctx=n_prompt + n_decode + 8, n_threads=threads, n_batch=512, verbose=False)
    prompt = [100 + (i * 37) % 60000 for i in range(n_prompt)]
    best_prefill = best_decode = 0.0
    for _ in range(3):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        best_prefill = max(best_prefill, n_prompt / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(n_decode):
            llm.eval([200 + i])
        best_decode = max(best_decode, n_decode / (time.perf_counter() - start))
    print(f"llama.cpp {path.rsplit('/', 1)[-1]}: prefill {best_prefill:.0f} tok/s ({n_prompt}), "
          f"decode {best_decode:.1f} tok/s (best of 3)")


if __name__ == "__main__":
    main()
