"""Hostile checkpoint files (issue 24): each test damages a copy of a tiny checkpoint itself, runs the real
command in a child process under a memory limit and a timeout, and checks the exit code, one line on stderr
that names the culprit, and that nothing on disk changed. Sizes in config, headers, index and tokenizer files
are checked before memory is spent on them; the tokenizer library's panics and blow-ups are one line."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.tiny import make_checkpoint

pytestmark = pytest.mark.slow  # every test here starts the command as a child process

INFO_MEMORY = 768 << 20  # address space for `info`, which never imports torch
RUN_MEMORY = 3 << 30  # for commands that import torch and load the tiny model
TIMEOUT = 120  # seconds; the commands take a few, the hostile inputs took minutes before


def _limit(memory: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return apply


def lfm2(args: list[str], stdin: bytes = b"", cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed command in a child process (bounded in memory and time), with `stdin` as its input."""
    memory = INFO_MEMORY if args[0] == "info" else RUN_MEMORY
    env = {k: v for k, v in os.environ.items() if k != "LFM2_DEBUG"}
    return subprocess.run([sys.executable, "-m", "lfm2cli", *args], input=stdin, capture_output=True,
                          timeout=TIMEOUT, env=env, preexec_fn=_limit(memory), cwd=cwd)


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under `root`: a file's digest, a link's target, or the kind of anything else (a FIFO is never
    opened)."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = ("link", os.readlink(path))
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = ("kind", path.lstat().st_mode & 0o170000)
    return out


def refused(root: Path, args: list[str], words: list[str], code: int = 1, stdin: bytes = b"") -> str:
    """Run `args`; the command exits `code` with exactly one `error:` line on stderr that holds `words`, prints
    nothing on stdout unless it is `info`, and leaves `root` as it was. Returns the line."""
    before = snapshot(root)
    run = lfm2(args, stdin=stdin)
    err = run.stderr.decode("utf-8", "replace")
    assert run.returncode == code, (args, err)
    assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
    assert "Traceback" not in err and "panicked" not in err, err
    for word in words:
        assert word in err, (args, word, err)
    if args[0] != "info":
        assert run.stdout == b"", run.stdout[:200]
    assert snapshot(root) == before
    return err


def refused_by_info_and_generate(root: Path, words: list[str]) -> None:
    refused(root, ["info", str(root)], words)
    refused(root, ["generate", str(root), "-p", "hi", "-n", "2", "--device", "cpu"], words)


@pytest.fixture(scope="module")
def ckpt_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dense checkpoint with its tokenizer (single file)."""
    from tests.tiny_tokenizer import make_tokenizer

    return make_tokenizer(make_checkpoint(tmp_path_factory.mktemp("hostile") / "single"))


@pytest.fixture(scope="module")
def sharded_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same in shards, with the hub's index."""
    from tests.tiny_tokenizer import make_tokenizer

    root = make_checkpoint(tmp_path_factory.mktemp("hostile") / "sharded", max_shard_size="40KB")
    return make_tokenizer(root)


@pytest.fixture
def ckpt(ckpt_source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt_source, tmp_path / "ckpt"))


@pytest.fixture
def sharded(sharded_source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sharded_source, tmp_path / "sharded"))


def edit_json(file: Path, **changes: object) -> None:
    data = json.loads(file.read_text()) if file.is_file() else {}
    data.update(changes)
    file.write_text(json.dumps(data))


def header_of(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_header(file: Path, header: dict | str, body: bytes) -> None:
    blob = (header if isinstance(header, str) else json.dumps(header)).encode()
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def shards(root: Path) -> list[str]:
    index = json.loads((root / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def deep(levels: int) -> str:
    """JSON nested `levels` deep: an object of objects."""
    return '{"a":' * levels + "1" + "}" * levels


# ---- 1. sizes in config.json, headers and the index are checked before anything is built for them


@pytest.mark.parametrize("changes, words", [
    ({"num_hidden_layers": 10_000_000, "layer_types": None, "full_attn_idxs": [1]},
     ["'num_hidden_layers' is 10000000", "1,024"]),
    ({"num_hidden_layers": 3_000, "layer_types": ["conv"] * 3_000}, ["'num_hidden_layers' is 3000"]),
    ({"vocab_size": 10 ** 30}, ["'vocab_size'", "2,147,483,647"]),
])
def test_config_sizes_are_refused_before_any_layer_is_listed(ckpt: Path, changes: dict, words: list[str]) -> None:
    edit_json(ckpt / "config.json", **changes)
    refused_by_info_and_generate(ckpt, ["config.json", *words])
    refused(ckpt, ["bench", "--random", str(ckpt / "config.json"), "--device", "cpu", "--prompt-tokens", "4",
                   "--gen-tokens", "2", "--repeat", "1"], ["config.json", *words])


@pytest.mark.parametrize("changes, words", [
    ({"num_experts": 10_000_000}, ["'num_experts' is 10000000", "4,096"]),
    ({"num_experts": 4_000, "num_hidden_layers": 400, "layer_types": ["conv"] * 400},
     ["400 layers of 4000 experts", "131,072"]),
])
def test_moe_sizes_are_refused_before_any_expert_is_listed(tmp_path: Path, changes: dict, words: list[str]) -> None:
    """`bench --random` builds nothing: the tensor count is worked out from the sizes, not listed."""
    config = tmp_path / "config.json"
    from tests.tiny import MOE

    config.write_text(json.dumps({**MOE, "model_type": "lfm2_moe", **changes}))
    refused(tmp_path, ["bench", "--random", str(config), "--device", "cpu", "--prompt-tokens", "4",
                       "--gen-tokens", "2", "--repeat", "1", "--force"], ["config.json", *words])


def test_number_of_thousands_of_digits_in_a_header(ckpt: Path) -> None:
    file = ckpt / "model.safetensors"
    header, body = header_of(file)
    text = json.dumps(header).replace('"data_offsets": [0,', '"data_offsets": [' + "7" * 5_000 + ",", 1)
    assert "7" * 5_000 in text
    write_header(file, text, body)
    refused_by_info_and_generate(ckpt, ["model.safetensors", "a number of 5,000 digits"])


def test_huge_header_is_refused_unread(ckpt: Path) -> None:
    """Half a million zero-size entries (30 MB of header) would take about a gigabyte as Python objects: the
    header is refused from its length, against what the config's tensors need, before it is parsed."""
    file = ckpt / "model.safetensors"
    header, body = header_of(file)
    for i in range(500_000):
        header[f"junk.{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    write_header(file, header, body)
    refused_by_info_and_generate(ckpt, ["model.safetensors", "safetensors header is", "more than the"])


def test_shard_that_links_to_itself(sharded: Path) -> None:
    first, second = shards(sharded)[:2]
    (sharded / first).unlink()
    (sharded / first).symlink_to(first)
    refused_by_info_and_generate(sharded, ["model.safetensors.index.json", first, "a loop of links"])
    # two shards that link to each other
    (sharded / first).unlink()
    (sharded / second).unlink()
    (sharded / first).symlink_to(second)
    (sharded / second).symlink_to(first)
    refused_by_info_and_generate(sharded, ["model.safetensors.index.json", "a loop of links"])


def test_index_of_junk_entries_is_refused_unread(sharded: Path) -> None:
    """300,000 entries naming the first shard: refused from the index's size (it used to take 36 s)."""
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = shards(sharded)[0]
    data["weight_map"].update({f"junk.layer.{i}.weight": shard for i in range(300_000)})
    index.write_text(json.dumps(data))
    refused_by_info_and_generate(sharded, ["model.safetensors.index.json", "bytes, more than the"])


@pytest.mark.parametrize("junk, words", [
    (200, ["'weight_map' has", "entries for a model of"]),
    (3, ["'weight_map' places junk.", "which does not hold it", "and 2 more"]),
])
def test_index_entries_that_no_shard_holds(sharded: Path, junk: int, words: list[str]) -> None:
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].update({f"junk.{i}.weight": shards(sharded)[0] for i in range(junk)})
    index.write_text(json.dumps(data))
    refused_by_info_and_generate(sharded, ["model.safetensors.index.json", *words])


@pytest.mark.parametrize("file", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_deeply_nested_json_files(ckpt: Path, file: str) -> None:
    (ckpt / file).write_text(deep(100_000))
    refused_by_info_and_generate(ckpt, [file, "nested too deeply"])


def test_deeply_nested_index(sharded: Path) -> None:
    (sharded / "model.safetensors.index.json").write_text('{"metadata": ' + deep(100_000) + "}")
    refused_by_info_and_generate(sharded, ["model.safetensors.index.json", "nested too deeply"])


@pytest.mark.parametrize("name", ["m" * 300, "owner/" + "r" * 300, "./" + "d" * 280 + "/x"])
def test_model_name_longer_than_any_file_name(tmp_path: Path, name: str) -> None:
    for command in (["info", name], ["generate", name, "-p", "hi"]):
        refused(tmp_path, command, ["characters) is not a local directory"], code=2)


def test_tools_and_schema_files_past_their_bounds(ckpt: Path, tmp_path: Path) -> None:
    tools = tmp_path / "tools.json"
    base = ["generate", str(ckpt), "-p", "hi", "-n", "2", "--device", "cpu"]
    tools.write_text("[" * 100_000 + "]" * 100_000)
    refused(tmp_path, [*base, "--tools", str(tools)], [str(tools), "nested too deeply"], code=2)
    tools.write_text(json.dumps([{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": 5}}}]))
    refused(tmp_path, [*base, "--tools", str(tools)], [str(tools), "properties"], code=2)
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "integer", "maximum": ' + "9" * 4_400 + "}")
    refused(tmp_path, [*base, "--schema", str(schema)], [str(schema), "a number of 4,400 digits"], code=2)
    inline = deep(15_000)  # inline, and longer than a file name may be
    refused(tmp_path, [*base, "--schema", inline], ["--schema", "nests more than"], code=2)


# ---- 2. tokenizer.json: checked before the tokenizers library reads it; its panics are one line


def edit_tokenizer(root: Path, change: Callable[[dict], None]) -> None:
    file = root / "tokenizer.json"
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def test_catastrophic_split_regex_is_one_line(ckpt: Path) -> None:
    """`(x+x+)+y` backtracks without end on a run of x: the library's regex engine gives up and its Rust code
    panics. One line, naming the file; the panic's own report never reaches the terminal."""
    def split(data: dict) -> None:
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(x+x+)+y"}, "behavior": "Isolated", "invert": False},
            data["pre_tokenizer"]]}
    edit_tokenizer(ckpt, split)
    assert lfm2(["info", str(ckpt)]).returncode == 0  # loads: only some texts make it fail
    refused(ckpt, ["generate", str(ckpt), "-n", "2", "--device", "cpu", "--raw"],
            [str(ckpt / "tokenizer.json"), "the tokenizer failed while encoding", "retry-limit"],
            stdin=b"x" * 4_000)


def test_catastrophic_split_regex_under_serve(ckpt: Path, tmp_path: Path) -> None:
    """The same tokenizer under `serve`: a JSON 500 that names the tokenizer file (the server cannot help it,
    the client did nothing wrong), no traceback or panic report in the log, and the server keeps serving."""
    import socket
    import time
    import urllib.error
    import urllib.request

    def split(data: dict) -> None:
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(y+y+)+z"}, "behavior": "Removed", "invert": False},
            data["pre_tokenizer"]]}
    edit_tokenizer(ckpt, split)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "lfm2cli", "serve", str(ckpt), "--port", str(port),
                               "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=log,
                              preexec_fn=_limit(RUN_MEMORY))

    def post(path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        deadline = time.monotonic() + TIMEOUT
        while b"listening on" not in (tmp_path / "serve.log").read_bytes():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        model = str(ckpt)
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 4_000}]}),
                           ("/v1/completions", {"prompt": "y" * 4_000})):
            status, reply = post(path, {"model": model, "max_tokens": 2, **body})
            assert status == 500 and "tokenizer.json: the tokenizer failed" in reply["error"]["message"], reply
        status, reply = post("/v1/completions", {"model": model, "max_tokens": 2, "prompt": "hello"})
        assert status == 200, reply
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in text and "panicked" not in text, text


@pytest.mark.parametrize("section, step, words", [
    ("normalizer", {"type": "Replace", "pattern": {"Regex": ""}, "content": "Q" * 100_000},
     ["the normalizer's Replace steps make a text up to 100,001 times longer"]),
    ("normalizer", {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"String": "e"}, "content": "ee"}] * 4},
     ["the normalizer's Replace steps make a text up to 27 times longer"]),
    ("decoder", {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "a"}, "content": "bbbbb"},
        {"type": "Replace", "pattern": {"String": "b"}, "content": "ccccc"},
        {"type": "Replace", "pattern": {"String": "c"}, "content": "dd"}]},
     ["the decoder's Replace steps make a text up to 36 times longer"]),
])
def test_tokenizer_that_multiplies_text_is_refused(ckpt: Path, section: str, step: dict, words: list[str]) -> None:
    edit_tokenizer(ckpt, lambda data: data.update({section: step}))
    refused_by_info_and_generate(ckpt, ["tokenizer.json", *words])


def test_tokenizer_sizes(ckpt: Path) -> None:
    edit_tokenizer(ckpt, lambda data: data["model"]["vocab"].update({"z" * 50_000: 399}))
    refused_by_info_and_generate(ckpt, ["tokenizer.json", "a token of 50,000 characters"])
    (ckpt / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)
    refused_by_info_and_generate(ckpt, ["tokenizer.json", "nested too deeply"])
    with (ckpt / "tokenizer.json").open("wb") as f:
        f.truncate(65 << 20)  # sparse: 65 MB of NUL bytes, never read
    refused_by_info_and_generate(ckpt, ["tokenizer.json", "68,157,440 bytes, more than the"])


# ---- 3. a prompt that cannot fit the context is refused before it is all tokenised


def test_prompt_of_40_megabytes_is_refused_early(ckpt: Path) -> None:
    """Tokenised whole, 40 MB of text took 82 s and 11.8 GB: counted in pieces, it stops after the first."""
    text = (b"the river runs past the mountain and " * 1_100_000)[:40_000_000]
    for raw in ([], ["--raw"]):
        line = refused(ckpt, ["generate", str(ckpt), "-n", "2", "--device", "cpu", *raw],
                       ["the prompt needs more than 2,048 tokens", "the model's context holds 2,048"], stdin=text)
        assert "40,000,0" in line  # the prompt's length in characters


def test_system_prompt_that_fills_the_context_is_refused(ckpt: Path, tmp_path: Path) -> None:
    long = "mountain river " * 3_000
    env_home = {"LFM2_HOME": str(tmp_path / "home")}
    run = subprocess.run([sys.executable, "-m", "lfm2cli", "chat", str(ckpt), "--device", "cpu"],
                         input=f"/system {long}\n/system\n".encode(), capture_output=True, timeout=TIMEOUT,
                         env={**os.environ, **env_home}, preexec_fn=_limit(RUN_MEMORY))
    err = run.stderr.decode()
    assert run.returncode == 0, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "this system prompt does not fit" in errors[0], err
    assert "context holds 2,048" in errors[0]
    assert "(no system prompt)" in run.stdout.decode() + err  # the session went on, with the old one


# ---- 4. info runs the same checks as loading, and says ok only when loading would work


def test_missing_tokenizer_is_not_ok(ckpt: Path) -> None:
    (ckpt / "tokenizer.json").unlink()
    run = lfm2(["info", str(ckpt)])
    out = run.stdout.decode()
    assert run.returncode == 0 and "check: ok" not in out
    assert "check: no tokenizer.json in" in out and "generate, chat and serve need" in out
    refused(ckpt, ["generate", str(ckpt), "-p", "hi", "-n", "2", "--device", "cpu"], ["no tokenizer.json"])


def test_tokenizer_json_that_is_a_fifo(ckpt: Path) -> None:
    """Opening a FIFO for reading waits for a writer: it is never opened, and named."""
    (ckpt / "tokenizer.json").unlink()
    os.mkfifo(ckpt / "tokenizer.json")
    refused_by_info_and_generate(ckpt, ["tokenizer.json", "not a regular file"])


@pytest.mark.parametrize("shape", ["same", "other"])
def test_tensor_in_two_shards(sharded: Path, shape: str) -> None:
    from safetensors.torch import load_file, save_file

    first, second = shards(sharded)[:2]
    name, tensor = next(iter(load_file(sharded / first).items()))
    tensors = load_file(sharded / second)
    tensors[name] = tensor if shape == "same" else tensor.flatten()[:1].clone()
    save_file(tensors, sharded / second, metadata={"format": "pt"})
    refused_by_info_and_generate(sharded, [f"tensor {name} is in both {first} and {second}"])


def test_overlapping_and_unaligned_offsets(ckpt: Path) -> None:
    file = ckpt / "model.safetensors"
    original, body = header_of(file)
    header = json.loads(json.dumps(original))
    norms = sorted((n for n in header if n.startswith("model.layers.") and n.endswith("norm.weight")),
                   key=lambda n: header[n]["data_offsets"][0])
    a, b = norms[:2]
    header[b]["data_offsets"] = header[a]["data_offsets"]  # both read the same 256 bytes
    write_header(file, header, body)
    refused_by_info_and_generate(ckpt, ["model.safetensors", "overlap", a, b])

    header = json.loads(json.dumps(original))
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    start, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [start + 2, end + 2]  # an F32 tensor two bytes into a float
    write_header(file, header, body + b"\0\0")
    refused_by_info_and_generate(ckpt, ["model.safetensors", f"tensor {last} starts at byte {start + 2}",
                                        "not a multiple of its F32 element size"])


def test_weights_linked_from_outside_the_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    (ckpt / "model.safetensors").rename(outside)
    (ckpt / "model.safetensors").symlink_to(outside)
    refused_by_info_and_generate(ckpt, ["model.safetensors is a link to", "outside the checkpoint directory"])


def test_tokenizer_smaller_than_the_vocabulary_is_mentioned(ckpt: Path) -> None:
    """400 token ids for 512 embedding rows: it loads (a padded table is common), and info says which ids the
    model could emit that decode to nothing."""
    run = lfm2(["info", str(ckpt)])
    out = run.stdout.decode()
    assert run.returncode == 0 and "check: ok" in out.splitlines()
    assert "tokenizer.json: yes; ids 400 to 511 (in the model's vocabulary) decode to nothing" in out
    desc = json.loads(lfm2(["info", str(ckpt), "--json"]).stdout)
    assert desc["tokens"]["undecodable_ids"] == [400, 511]


def test_control_characters_in_names_are_shown_escaped(ckpt: Path, sharded: Path) -> None:
    """Names from the files reach error messages as visible escapes, never as the characters a terminal acts
    on (ESC sequences, bidi overrides, NUL)."""
    file = ckpt / "model.safetensors"
    header, body = header_of(file)
    evil = "model.\x1b]0;pwned\x07.\u202eetaluclac.\x00weight"
    header[evil] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    write_header(file, header, body)
    for args in (["info", str(ckpt)], ["generate", str(ckpt), "-p", "hi", "-n", "2", "--device", "cpu"]):
        line = refused(ckpt, args, ["unexpected", "\\x1b]0;pwned\\x07", "\\u202e", "\\x00weight"])
        assert not any(c in line for c in "\x1b\x07\u202e\x00")
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = "evil\x1b[2J\u2066.safetensors"
    index.write_text(json.dumps(data))
    line = refused(sharded, ["info", str(sharded)], ["missing", "evil\\x1b[2J\\u2066.safetensors"])
    assert "\x1b" not in line and "\u2066" not in line
