"""Runs llama.cpp (llama-cpp-python) for benchmarks/compare.py, in the Python that has it installed (the venv
that benchmarks/peers/setup builds): loads one GGUF, then reads one JSON request per line on stdin,
{"prompt": [token ids], "new": N}, and answers each with one JSON line of timings. The prompt is evaluated as one
batch (prefill), then N - 1 single tokens (decode), as lfm2's generation loop does after its first token.

    VENV/bin/python benchmarks/llama_cpp_worker.py MODEL.gguf CONTEXT THREADS
"""

import json
import sys
import time

from llama_cpp import Llama, llama_print_system_info


def main() -> None:
    path, context, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    llm = Llama(model_path=path, n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    print(json.dumps({"ready": True, "system": llama_print_system_info().decode()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(req["prompt"])
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        for i in range(req["new"] - 1):
            llm.eval([100 + i % 1000])  # fixed tokens: the weights are random, only the speed counts
        decode = time.perf_counter() - t1
        print(json.dumps({"prefill_s": first, "decode_s": decode}), flush=True)


if __name__ == "__main__":
    main()
