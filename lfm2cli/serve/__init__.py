"""`lfm2 serve`: one loaded model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

- `protocol`: request bodies checked field by field into plain dataclasses, and the OpenAI-shaped responses and
  stream chunks.
- `engine`: the one model instance; one generation at a time in a worker thread, a bounded FIFO queue, cancellation
  at the next token, and the cache of the last conversation reused by its longest common prefix.
- `app`: the FastAPI app: endpoints, API key, body limit, the request log line, errors as OpenAI's JSON.
- `access`: which Host names and which web pages (Origin) are answered: cross-site requests, DNS rebinding.

No terminal code: the command (`lfm2cli/commands/serve.py`) binds the socket, loads the model and prints.
"""
