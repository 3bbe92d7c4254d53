#!/usr/bin/env python3
"""Time to first token of `lfm2 serve` for a resent conversation (a chat client sends the whole conversation each
turn), with the server's prefix cache against a cold prefill of the same request.

    python benchmarks/serve_ttft.py                      # LFM2-350M's shape, a ~2,000-token conversation
    python benchmarks/serve_ttft.py --tokens 4000 --repeat 5

The model has LFM2-350M's shape with random weights (bf16 on CPU, lfm2's own kernels; `--device cuda` on a GPU) and
the test suite's tiny tokenizer: only the number of ids matters here, not the text. The server runs in this process
on 127.0.0.1 and is driven over HTTP, so the times are what a client sees. Each measured request asks for one
token (max_tokens 1), so its time is the time to its first token:

- cold: the conversation plus one new message, while the cache holds an unrelated conversation (all of it is
  prefilled);
- resent: the same request right after the server answered the conversation, so the cache holds the conversation
  and the reply (only the reply, which the client sends back as text, and the new message are prefilled).
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree, not whatever lfm2cli is installed
sys.path.insert(0, str(ROOT / "tests"))

WORDS = ("the model reads text as a sequence of tokens and predicts the next one small models run on a laptop "
         "a phone or a single graphics card liquid designed a hybrid of short convolutions and attention").split()


def conversation(tok, target: int, seed: int) -> list[dict]:
    """User and assistant turns of random words, about `target` tokens once rendered, ending with a user turn."""
    rng = random.Random(seed)
    messages: list[dict] = [{"role": "system", "content": "You are a helpful assistant."}]
    while len(tok.encode(tok.apply_chat_template(messages))) < target:
        role = "user" if messages[-1]["role"] != "user" else "assistant"
        messages.append({"role": role, "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120)))})
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "Go on."})
    return messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lfm2-350m", help="a published model's shape (random weights)")
    ap.add_argument("--tokens", type=int, default=2000, help="conversation length, in tokens")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import httpx
    import torch
    import uvicorn
    from tiny_tokenizer import make_tokenizer

    from lfm2cli.benchmark import random_config
    from lfm2cli.loading import loader
    from lfm2cli.serve.app import create_app
    from lfm2cli.serve.engine import Engine
    from lfm2cli.text.tokenizer import load_tokenizer

    device = torch.device(args.device)
    loader.configure_threads(device)
    cfg, _ = random_config(args.model)
    dtype = torch.bfloat16
    model = loader.random_model(cfg, device, dtype)
    tok_dir = make_tokenizer(Path(tempfile.mkdtemp()))
    lm = loader.LoadedModel(model, cfg, tok_dir, device, dtype, tokenizer=load_tokenizer(tok_dir))
    engine = Engine(lm, queue_size=4)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench"), log_level="warning", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    def ask(messages: list[dict], max_tokens: int) -> tuple[float, dict]:
        body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        t0 = time.perf_counter()
        r = httpx.post(url, json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()

    tok = lm.tokenizer
    convo = conversation(tok, args.tokens, 0)
    other = conversation(tok, args.tokens, 1)
    ask(other[:3], 4)  # warm-up: kernels built, caches grown
    cold, warm, sizes = [], [], []
    for i in range(args.repeat):
        new = {"role": "user", "content": f"One more question, number {i}?"}
        # resent: the server answers the conversation, then the client resends it with the reply and one message
        _, first = ask(convo, 16)
        reply = first["choices"][0]["message"]["content"]
        request = [*convo, {"role": "assistant", "content": reply}, new]
        seconds, data = ask(request, 1)
        warm.append(seconds)
        usage = data["usage"]
        sizes.append((usage["prompt_tokens"], usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]))
        # cold: the same request after an unrelated conversation took the cache
        ask(other, 1)
        seconds, data = ask(request, 1)
        cold.append(seconds)
        assert data["usage"]["prompt_tokens_details"]["cached_tokens"] <= 1  # BOS at most
    server.should_exit = True

    prompt, prefilled = sizes[-1]
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"{args.model} shape, random weights, {device.type} {str(dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads; a {prompt}-token request (median of {args.repeat})")
    print(f"cold prefill:          {c * 1000:8.1f} ms to the first token ({prompt} prompt tokens prefilled)")
    print(f"resent, cache reused:  {w * 1000:8.1f} ms to the first token ({prefilled} prompt tokens prefilled)")
    print(f"ratio: {w / c:.1%} of the cold time")


if __name__ == "__main__":
    main()
