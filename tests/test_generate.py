"""`lfm2 generate` and the generation loop under it, end to end on tiny checkpoints."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lfm2cli.cli import app
from lfm2cli.decoding.loop import GenerationStats, decode_tokens
from lfm2cli.decoding.sampling import Sampler, SamplingParams
from lfm2cli.errors import GenerationError
from lfm2cli.loading.loader import load
from lfm2cli.runs.local import TextRun
from lfm2cli.runs.prompt import one_shot_prompt
from tests.tiny import reference_model

ANSI = re.compile(r"\x1b\[")
runner = CliRunner()


def lfm2(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm2cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["chat_ckpt", "chat_moe_ckpt"])
def test_greedy_raw_matches_reference_generate(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    lm = load(path, device="cpu", dtype="float32")
    text = "The quick brown fox jumps over the lazy dog"
    ids = one_shot_prompt(lm, text, raw=True).ids
    assert ids[0] == lm.tokenizer.bos_token_id  # raw prompts get BOS, like tokenizer(text)
    ref = reference_model(path)
    expected = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=1.05,
                            pad_token_id=0)[0, len(ids):].tolist()
    expected = expected[: expected.index(7)] if 7 in expected else expected
    result = runner.invoke(app, ["generate", str(path), "--prompt", text, "--raw", "--temperature", "0", "-n", "24",
                                 "--dtype", "float32", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["text"] == lm.tokenizer.decode(expected)
    assert out["stats"]["generated_tokens"] == len(expected)


@pytest.mark.slow
def test_stop_string_is_never_printed(chat_ckpt: Path) -> None:
    lm = load(chat_ckpt, device="cpu", dtype="float32")
    ids = one_shot_prompt(lm, "Tell me a story").ids
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    full = TextRun(lm, ids, greedy, 40).run()
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    run = TextRun(lm, ids, greedy, 40, stops=[stop])
    pieces = list(run.pieces())
    assert "".join(pieces) == full[: full.index(stop)]
    assert stop not in run.text and run.stats.finish_reason == "stop"


@pytest.mark.slow
def test_finish_reasons_and_stats(chat_ckpt: Path) -> None:
    lm = load(chat_ckpt, device="cpu", dtype="float32")
    ids = one_shot_prompt(lm, "Hello").ids
    run = TextRun(lm, ids, SamplingParams(temperature=0), 5)
    run.run()
    s = run.stats
    assert s.finish_reason == "length" and s.generated_tokens == 5 and len(run.tokens) == 5
    assert s.prompt_tokens == len(ids) and s.ttft_s > 0 and s.peak_memory_bytes > 0
    # an EOS id forced by a sampler that always picks it ends with "stop" and yields nothing
    stats = GenerationStats()
    out = list(decode_tokens(lm.model, ids, sampler=lambda logits, seen: 7, max_tokens=5, eos_ids=[7], stats=stats))
    assert out == [] and stats.finish_reason == "stop"


def test_rates_over_zero_tokens_are_a_dash(chat_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    """-n 1: the one token comes from prefill, so no decode step ran and there is no decode rate to show."""
    from lfm2cli.benchmark import Spread, _fmt
    from lfm2cli.terminal.formatting import rate
    from lfm2cli.terminal.render import stats_footer
    from tests.helpers import run_main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    greedy = ["-p", "hi", "-v", "-t", "0", "--dtype", "float32"]
    code, out, err = run_main(["generate", str(chat_ckpt), "-n", "1", *greedy], monkeypatch, capsys)
    assert code == 0
    assert re.fullmatch(r"\d+ prompt tokens, 1 generated \(length\); prefill \d+\.\d tok/s, decode - tok/s, "
                        r"first token \d+\.\d\d s, peak memory \d+\.\d\d GB\n", err), err
    code, out, err = run_main(["generate", str(chat_ckpt), "-n", "3", *greedy], monkeypatch, capsys)
    assert code == 0 and re.search(r"3 generated .* decode \d+\.\d tok/s", err), err
    assert [rate(x) for x in (0.0, None, float("nan"), 12.345, 0.04)] == ["-", "-", "-", "12.3", "0.0"]
    assert stats_footer(GenerationStats(generated_tokens=1, ttft_s=0.5).to_dict()) == \
        "1 token · - tok/s · first token 0.50 s"
    assert _fmt(Spread(0.0, 0.0, 0.0)) == "-" and _fmt(Spread(2.0, 1.0, 3.0)) == "2.0 (1.0-3.0)"


def test_seeded_sampling_is_reproducible(chat_ckpt: Path) -> None:
    lm = load(chat_ckpt, device="cpu", dtype="float32")
    ids = one_shot_prompt(lm, "Hello").ids
    p = SamplingParams(temperature=1.0, min_p=0.0, seed=42)
    a = list(decode_tokens(lm.model, ids, sampler=Sampler(p), max_tokens=20))
    b = list(decode_tokens(lm.model, ids, sampler=Sampler(p), max_tokens=20))
    assert a == b


def test_prompt_longer_than_context_fails_before_compute(chat_ckpt: Path) -> None:
    result = runner.invoke(app, ["generate", str(chat_ckpt), "--prompt", "word " * 3000, "--device", "cpu"])
    # CliRunner bypasses main()'s error boundary, so the error arrives as the exception itself
    assert isinstance(result.exception, GenerationError)
    assert "context holds 2048" in str(result.exception)


@pytest.mark.slow
def test_cli_errors_are_one_line(chat_ckpt: Path, tmp_path: Path) -> None:
    empty = lfm2("generate", str(chat_ckpt), "--prompt", "   ", stdin="")
    assert empty.returncode == 2 and empty.stderr.strip().startswith("error:") and "empty" in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1
    missing = lfm2("generate", str(tmp_path / "nowhere"), "--prompt", "hi", stdin="")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(chat_ckpt / f, no_tok / f)  # copies: a link out of the checkpoint is refused on its own
    r = lfm2("generate", str(no_tok), "--prompt", "hi", stdin="")
    assert r.returncode == 1 and "tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = lfm2("generate", str(chat_ckpt), "--prompt", "hi", "--temperature", "-1", stdin="")
    assert bad.returncode == 2


@pytest.mark.slow
def test_options_the_loader_skips_are_noted_on_stderr(chat_moe_ckpt: Path) -> None:
    """The library returns why it skipped --compile (MoE has no compiled step); the command says so on stderr."""
    r = lfm2("generate", str(chat_moe_ckpt), "--prompt", "hi", "-n", "2", "--compile", "--dtype", "float32",
             stdin="")
    assert r.returncode == 0, r.stderr
    assert "note: --compile ignored:" in r.stderr and "--compile" not in r.stdout


@pytest.mark.slow
def test_piped_stdin_and_plain_stdout(chat_ckpt: Path) -> None:
    r = subprocess.run(f"echo 'some notes' | {sys.executable} -m lfm2cli generate {chat_ckpt} "
                       "--prompt Summarise -n 12 --seed 3 -v | cat", shell=True, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout and not ANSI.search(r.stdout)
    assert "prompt tokens" in r.stderr  # stats go to stderr, never into the answer
    # the piped text is part of the prompt: more prompt tokens than the instruction alone
    alone = lfm2("generate", str(chat_ckpt), "--prompt", "Summarise", "-n", "1", "--json", stdin="")
    piped = lfm2("generate", str(chat_ckpt), "--prompt", "Summarise", "-n", "1", "--json", stdin="some notes\n")
    assert json.loads(piped.stdout)["stats"]["prompt_tokens"] > json.loads(alone.stdout)["stats"]["prompt_tokens"]
    dash = lfm2("generate", str(chat_ckpt), "--prompt", "-", "-n", "1", "--json", stdin="Summarise")
    assert json.loads(dash.stdout)["stats"]["prompt_tokens"] == json.loads(alone.stdout)["stats"]["prompt_tokens"]


GREEDY = ["-t", "0", "--repetition-penalty", "1"]


@pytest.mark.slow
def test_broken_pipe_exits_quietly(endless_ckpt: Path) -> None:
    r = subprocess.run(f"{sys.executable} -m lfm2cli generate {endless_ckpt} --prompt hi -n 3000 "
                       f"{' '.join(GREEDY)} < /dev/null | head -c 10", shell=True, capture_output=True,
                       timeout=120)
    assert r.returncode == 0
    assert len(r.stdout) == 10
    assert b"Traceback" not in r.stderr and b"BrokenPipe" not in r.stderr and b"Exception" not in r.stderr


@pytest.mark.slow
def test_ctrl_c_keeps_output_and_exits_130(endless_ckpt: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "lfm2cli", "generate", str(endless_ckpt), "--prompt", "hi",
                             "-n", "50000", *GREEDY], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = proc.stdout.read(1)  # generation has started
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(first + rest) > 1 and b"Traceback" not in err
    # the same run with --json reports the interruption and what was generated before it
    proc = subprocess.Popen([sys.executable, "-m", "lfm2cli", "generate", str(endless_ckpt), "--prompt", "hi",
                             "-n", "50000", "--json", *GREEDY], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    data = json.loads(out)
    assert data["finish_reason"] == "interrupted" and data["stats"]["generated_tokens"] > 0


def _damaged_copy(src: Path, dst: Path, name: str, value: float) -> Path:
    """A copy of a checkpoint with every value of one tensor set to `value` (NaN or inf)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("value, sampling", [(float("nan"), ["-t", "0"]), (float("inf"), ["-t", "1", "--seed", "1"]),
                                             (float("nan"), ["-t", "1", "--seed", "1"])])
def test_non_finite_logits_stop_with_one_line(chat_ckpt: Path, tmp_path: Path, value: float,
                                              sampling: list[str]) -> None:
    """NaN/inf weights used to give 'generated' tokens of empty text (greedy) or an IndexError (sampled)."""
    damaged = _damaged_copy(chat_ckpt, tmp_path / "damaged", "model.embedding_norm.weight", value)
    before = (damaged / "model.safetensors").read_bytes()
    r = lfm2("generate", str(damaged), "-p", "hello", "-n", "8", "--dtype", "float32", *sampling, stdin="")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    assert "NaN/inf logits at generated token 1" in lines[0] and "damaged" in lines[0]
    assert r.stdout == ""  # no garbage text made it out
    assert (damaged / "model.safetensors").read_bytes() == before


def test_generate_refuses_non_finite_logits_from_the_loop(chat_ckpt: Path) -> None:
    """The check sits in the generation loop, so chat and bench get it too; a finite row passes."""
    lm = load(chat_ckpt, device="cpu", dtype="float32")
    ids = one_shot_prompt(lm, "Hello").ids
    calls = []

    def spy(logits: torch.Tensor, seen: torch.Tensor) -> int:
        calls.append(1)
        return 9

    original = lm.model.forward

    def poisoned(ids_: torch.Tensor, cache: object) -> torch.Tensor:
        out = original(ids_, cache)
        return out if len(calls) < 3 else out.clone().fill_(float("nan"))

    lm.model.forward = poisoned
    with pytest.raises(GenerationError, match="NaN/inf logits at generated token 4"):
        list(decode_tokens(lm.model, ids, sampler=spy, max_tokens=10))
    assert len(calls) == 3  # the sampler never saw the bad row


def test_as_text_replaces_invalid_utf8_only() -> None:
    from lfm2cli.terminal.input_text import as_text, read_stdin_text

    assert as_text(b"hello \xff\xfe world") == ("hello \ufffd\ufffd world", True)
    # what Python makes of those bytes in argv or a surrogateescape stdin
    assert as_text(b"hi \xff".decode("utf-8", "surrogateescape")) == ("hi \ufffd", True)
    assert as_text("caf\u00e9 \ufffd") == ("caf\u00e9 \ufffd", False)  # a real U+FFFD is no damage
    assert as_text("x \ud800") == ("x " + "\ufffd" * 3, True)
    import io

    stream = io.TextIOWrapper(io.BytesIO(b"a\xc3(b"), encoding="utf-8", errors="strict")
    assert read_stdin_text(stream) == ("a\ufffd(b", True)


@pytest.mark.slow
def test_invalid_utf8_on_stdin_and_prompt_is_replaced_with_one_note(chat_ckpt: Path) -> None:
    def run(stdin: bytes, prompt: bytes) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lfm2cli", "generate", str(chat_ckpt), "-p", prompt, "-n", "2",
                               "--json", "--dtype", "float32"], input=stdin, capture_output=True, timeout=120)

    bad = run(b"hello \xff\xfe world", b"sum \xff up")
    assert bad.returncode == 0, bad.stderr
    lines = bad.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: ") and "Traceback" not in lines[0]
    assert "stdin and --prompt" in lines[0] and "invalid UTF-8" in lines[0]
    # the prompt the model saw is the text with U+FFFD in place of the bad bytes
    same = run("hello \ufffd\ufffd world".encode(), "sum \ufffd up".encode())
    assert same.returncode == 0 and same.stderr == b""
    assert json.loads(bad.stdout)["stats"]["prompt_tokens"] == json.loads(same.stdout)["stats"]["prompt_tokens"]


def _sh(command: str, **env: str) -> subprocess.CompletedProcess:
    """`command` under bash with pipefail, `lfm2` standing for this checkout's entry point."""
    lfm2_cmd = f"{sys.executable} -m lfm2cli"
    return subprocess.run(["bash", "-c", "set -o pipefail; " + command.replace("lfm2 ", lfm2_cmd + " ")],
                          capture_output=True, text=True, errors="replace", timeout=180,
                          env={**os.environ, **env})


@pytest.mark.slow
def test_closed_pipe_exits_0_for_every_command(chat_ckpt: Path, tmp_path: Path) -> None:
    """`| true` closes the pipe long before Python starts writing, so each command meets a broken pipe; `head -c1`
    closes it in the middle of a streamed answer. click and rich both used to turn that into exit 1."""
    from lfm2cli.store.conversations import HistoryStore

    home = tmp_path / "home"
    home.mkdir()
    with HistoryStore(home / "history.db") as store:
        for i in range(30):
            conv = store.create_conversation("tiny")
            store.add_message(conv.id, "user", f"question {i}")
            store.add_message(conv.id, "assistant", "answer " * 200, finish_reason="stop")
    before = (home / "history.db").read_bytes()
    m = str(chat_ckpt)
    commands = [
        f"lfm2 generate {m} -p hello -n 40 --dtype float32 </dev/null | head -c1",
        f"lfm2 generate {m} -p hello -n 4 --dtype float32 --json </dev/null | true",
        f"lfm2 info {m} | true",
        f"lfm2 info {m} --json | true",
        "lfm2 history list | true",
        f"lfm2 history show {conv.id} | true",
        "lfm2 --help | true",
    ]
    for command in commands:
        r = _sh(command, LFM2_HOME=str(home))
        assert r.returncode == 0, (command, r.stderr)
        assert r.stderr == "", (command, r.stderr)
    assert (home / "history.db").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("redirect, message", [(">&-", "error: stdout is closed"),
                                               (">/dev/full", "error: writing to stdout failed: No space left on "
                                                              "device (ENOSPC)")])
def test_unwritable_stdout_is_one_line(chat_ckpt: Path, redirect: str, message: str) -> None:
    if redirect == ">/dev/full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    for command in (f"lfm2 generate {chat_ckpt} -p hello -n 4 --dtype float32 </dev/null {redirect}",
                    f"lfm2 info {chat_ckpt} {redirect}"):
        r = _sh(command)
        assert r.returncode == 1, (command, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (command, r.stderr)
        assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr


@pytest.fixture(scope="module")
def short_context(endless_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The endless checkpoint (greedy never picks EOS) with a 40-token context: replies run into its end."""
    import shutil

    from tests.tiny import edit_config

    path = Path(shutil.copytree(endless_ckpt, tmp_path_factory.mktemp("short") / "ckpt"))
    edit_config(path, max_position_embeddings=40)
    return path


@pytest.mark.slow
def test_context_limit_is_told_apart_from_max_tokens(short_context: Path) -> None:
    from lfm2cli.runs.local import length_stop_note

    lm = load(short_context, device="cpu", dtype="float32")
    ids = one_shot_prompt(lm, "hi").ids
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    full = TextRun(lm, ids, greedy, 1000)
    full.run()
    s = full.stats
    assert s.finish_reason == "length" and s.length_limit == "context" and s.context_tokens == 40
    assert s.prompt_tokens + s.generated_tokens == 40  # every position used: the last token is never fed back
    assert length_stop_note(s, 1000) == "stopped because the model's context is full (40 tokens)"
    capped = TextRun(lm, ids, greedy, 3)
    capped.run()
    assert capped.stats.finish_reason == "length" and capped.stats.length_limit == "max_tokens"
    assert length_stop_note(capped.stats, 3) == "stopped at the max_tokens limit (3 tokens)"


@pytest.mark.slow
def test_cli_says_the_context_not_max_tokens_ended_the_reply(short_context: Path) -> None:
    r = lfm2("generate", str(short_context), "-p", "hi", "-n", "1000", "--json", *GREEDY, "--dtype", "float32",
             stdin="")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "length" and out["stats"]["length_limit"] == "context"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "context is full (40 tokens)" in lines[0] and "max_tokens" not in lines[0]
    capped = lfm2("generate", str(short_context), "-p", "hi", "-n", "3", "--json", *GREEDY, "--dtype", "float32",
                  stdin="")
    assert capped.returncode == 0 and capped.stderr == ""
    assert json.loads(capped.stdout)["stats"]["length_limit"] == "max_tokens"


# Thinking models: a tiny checkpoint never thinks by itself, so these tests script the token stream the model
# "generates" and check what the command makes of it. The scripts use LFM2.5's layout: `<think>`, the
# reasoning, `</think>`, a blank line, the answer.

def _scripted(ids: list[int], prompts: list[list[int]]):
    """A stand-in for the generation loop that yields `ids` and records the prompt it was given."""

    def fake(model: object, prompt: list[int], *, stats: GenerationStats, **_: object):
        prompts.append(list(prompt))
        stats.prompt_tokens = len(prompt)
        for i in ids:
            stats.generated_tokens += 1
            yield i
        stats.finish_reason = "stop"

    return fake


def _generate(args: list[str], script: list[int], monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture) -> tuple[int, str, str, list[list[int]]]:
    """`lfm2 generate ARGS` through the real entry point, the model's output being `script`."""
    import io

    from tests.helpers import run_main

    prompts: list[list[int]] = []
    monkeypatch.setattr("lfm2cli.runs.local.decode_tokens", _scripted(script, prompts))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, err = run_main(["generate", *args, "--dtype", "float32", "--device", "cpu"], monkeypatch, capsys)
    return code, out, err, prompts


def _ids(path: Path, *parts: str) -> list[int]:
    """Token ids for the parts in order; "<think>" and "</think>" are their special tokens where the tokenizer
    has them (as the model writes them), else the text's ordinary tokens."""
    from lfm2cli.text.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    ids: list[int] = []
    for part in parts:
        special = tok.special_tokens.get(part)
        ids += [special] if special is not None else tok.encode(part)
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("markers", ["special tokens", "plain text"])
def test_generate_prints_only_the_answer_of_a_model_that_thinks(markers: str, think_ckpt: Path, chat_ckpt: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    path = think_ckpt if markers == "special tokens" else chat_ckpt
    script = _ids(path, "<think>", "\nThe user asks 2 + 2. That is 4.\n", "</think>", "\n\nThe answer is 4.")
    if markers == "special tokens":
        assert len(script) < len(_ids(chat_ckpt, "<think>", "\nThe user asks 2 + 2. That is 4.\n", "</think>",
                                      "\n\nThe answer is 4."))
    code, out, err, _ = _generate([str(path), "-p", "What is 2 + 2?"], script, monkeypatch, capsys)
    assert (code, out, err) == (0, "The answer is 4.\n", "")
    code, out, err, _ = _generate([str(path), "-p", "What is 2 + 2?", "--think", "show"], script, monkeypatch,
                                  capsys)
    assert (code, out) == (0, "The answer is 4.\n")
    assert err == "The user asks 2 + 2. That is 4.\n" and not ANSI.search(err)  # plain text when piped
    code, out, err, _ = _generate([str(path), "-p", "What is 2 + 2?", "--json", "--think", "show"], script,
                                  monkeypatch, capsys)
    data = json.loads(out)
    assert code == 0 and err == ""  # --json carries the reasoning itself
    assert list(data) == ["text", "reasoning", "finish_reason", "model", "stats"]
    assert data["text"] == "The answer is 4." and data["reasoning"] == "The user asks 2 + 2. That is 4."
    assert data["finish_reason"] == "stop" and data["stats"]["generated_tokens"] == len(script)


@pytest.mark.slow
def test_a_prompt_that_opens_the_block_starts_in_the_reasoning(opening_ckpt: Path, think_ckpt: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    from lfm2cli.text.tokenizer import load_tokenizer

    # The template wrote `<think>`: the model's output begins inside the block and only closes it.
    script = _ids(opening_ckpt, "Two and two make 4.", "</think>", "\n\n4")
    code, out, err, prompts = _generate([str(opening_ckpt), "-p", "2 + 2?", "--think", "show"], script,
                                        monkeypatch, capsys)
    tok = load_tokenizer(opening_ckpt)
    assert tok.decode(prompts[0], skip_special_tokens=False).endswith("<|im_start|>assistant\n<think>\n")
    assert (code, out, err) == (0, "4\n", "Two and two make 4.\n")
    # The same output after a prompt that did not open it is all answer, the stray tag included.
    code, out, err, _ = _generate([str(think_ckpt), "-p", "2 + 2?", "--json"], script, monkeypatch, capsys)
    data = json.loads(out)
    assert (data["text"], data["reasoning"]) == ("Two and two make 4.</think>\n\n4", "")
    # --raw: the user's own text is the prompt, and it opened the block.
    raw = "<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    code, out, err, prompts = _generate([str(think_ckpt), "-p", raw, "--raw", "--json"], script, monkeypatch,
                                        capsys)
    data = json.loads(out)
    assert prompts[0] == [tok.bos_token_id, *tok.encode(raw)]
    assert (data["text"], data["reasoning"]) == ("4", "Two and two make 4.")


def test_stop_strings_apply_to_the_answer_only(think_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    script = _ids(think_ckpt, "<think>", "\nIs it 4? Yes, 4.\n", "</think>", "\n\nIt is 4, surely.")
    code, out, err, _ = _generate([str(think_ckpt), "-p", "2 + 2?", "--stop", "4", "--json"], script, monkeypatch,
                                  capsys)
    data = json.loads(out)
    assert code == 0 and data["reasoning"] == "Is it 4? Yes, 4."  # the stop string inside the block is no stop
    assert data["text"] == "It is " and data["finish_reason"] == "stop"
    code, out, err, _ = _generate([str(think_ckpt), "-p", "2 + 2?", "--stop", "4", "--think", "show"], script,
                                  monkeypatch, capsys)
    assert (code, out, err) == (0, "It is \n", "Is it 4? Yes, 4.\n")


def test_a_reply_cut_inside_the_block_is_all_reasoning(think_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    script = _ids(think_ckpt, "<think>", "\nFirst, let me think about")
    code, out, err, _ = _generate([str(think_ckpt), "-p", "hi", "--think", "show"], script, monkeypatch, capsys)
    assert (code, out, err) == (0, "", "First, let me think about\n")
    code, out, err, _ = _generate([str(think_ckpt), "-p", "hi", "--json"], script, monkeypatch, capsys)
    assert (json.loads(out)["text"], json.loads(out)["reasoning"]) == ("", "First, let me think about")


@pytest.mark.slow
@pytest.mark.parametrize("reply", ["  \n<b>Bold</b> and <think>a tag</think> in the answer\n",
                                   "\n\n<thi", "</think> first\n\n", "plain"])
def test_a_reply_without_a_leading_block_is_printed_as_is(reply: str, think_ckpt: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    script = _ids(think_ckpt, reply)
    code, out, err, _ = _generate([str(think_ckpt), "-p", "hi", "--think", "show"], script, monkeypatch, capsys)
    assert (code, out, err) == (0, reply if reply.endswith("\n") else reply + "\n", "")
    code, out, err, _ = _generate([str(think_ckpt), "-p", "hi", "--json"], script, monkeypatch, capsys)
    assert (json.loads(out)["text"], json.loads(out)["reasoning"]) == (reply, "")


@pytest.mark.slow
def test_a_model_that_never_thinks_prints_what_it_always_did(chat_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """The real loop on the tiny checkpoint: stdout is the text of the run without the split, byte for byte."""
    import io

    from tests.helpers import run_main

    lm = load(chat_ckpt, device="cpu", dtype="float32")
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    for prompt in ("Tell me a story", "Hello"):
        ids = one_shot_prompt(lm, prompt).ids
        before = TextRun(lm, ids, greedy, 30).run()
        assert before.strip()
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        code, out, err = run_main(["generate", str(chat_ckpt), "-p", prompt, "-n", "30", *GREEDY, "--dtype",
                                   "float32", "--device", "cpu"], monkeypatch, capsys)
        assert (code, err) == (0, "") and out == before + ("" if before.endswith("\n") else "\n")
        stop = before[len(before) // 2: len(before) // 2 + 3]
        cut = TextRun(lm, ids, greedy, 30, stops=[stop]).run()
        code, out, err = run_main(["generate", str(chat_ckpt), "-p", prompt, "-n", "30", *GREEDY, "--stop", stop,
                                   "--json", "--dtype", "float32", "--device", "cpu"], monkeypatch, capsys)
        data = json.loads(out)
        assert (data["text"], data["reasoning"], data["finish_reason"]) == (cut, "", "stop")


def test_reasoning_on_a_terminal_is_dimmed_and_ends_its_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from lfm2cli.commands.generate_output import ReasoningOut

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    out = ReasoningOut()
    out.feed("2 + 2 [bold]is[/bold] 4")  # markup in the model's text is text
    out.end()
    out.end()  # a second end (answer, then the end of the reply) adds nothing
    text = err.getvalue()
    assert ANSI.search(text) and text.endswith("\n") and text.count("\n") == 1
    assert re.sub(r"\x1b\[[0-9;]*m", "", text) == "2 + 2 [bold]is[/bold] 4\n"


def test_think_takes_show_or_hide_only(chat_ckpt: Path) -> None:
    result = runner.invoke(app, ["generate", str(chat_ckpt), "-p", "hi", "--think", "fold"])
    assert result.exit_code == 2 and "'fold' is not one of 'show', 'hide'" in result.output


# Tool calls (`--tools`): as with thinking, a tiny checkpoint never calls a tool by itself, so the model's output is
# scripted. The tiny tokenizer has LFM2's `<|tool_call_start|>`/`<|tool_call_end|>` as special tokens.

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["location"]}}}
CALENDAR = {"name": "Calendar.create_event", "description": "Add an event",
            "parameters": {"type": "object", "properties": {"title": {"type": "string"}}}}
CALLS = "[get_weather(location=\"Paris\", unit=None), Calendar.create_event(title='Café \\\"fête\\\"')]"


@pytest.fixture
def tools_file(tmp_path: Path) -> Path:
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([WEATHER, CALENDAR]), encoding="utf-8")
    return path


def test_tool_calls_go_to_stderr_and_json_never_to_stdout(chat_ckpt: Path, tools_file: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    from lfm2cli.text.tokenizer import load_tokenizer

    head = _ids(chat_ckpt, "Let me check.\n", "<|tool_call_start|>", CALLS, "<|tool_call_end|>")
    script = head + _ids(chat_ckpt, "Text the model should never get to write")
    args = [str(chat_ckpt), "-p", "Weather in Paris?", "--tools", str(tools_file)]
    code, out, err, prompts = _generate(args, script, monkeypatch, capsys)
    assert (code, out) == (0, "Let me check.\n")
    assert err == ('tool call: get_weather(location="Paris", unit=None)\n'
                   'tool call: Calendar.create_event(title="Café \\"fête\\"")\n')
    # The template listed both tools for the model, in the system turn before the user's.
    prompt = load_tokenizer(chat_ckpt).decode(prompts[0], skip_special_tokens=False)
    assert "<|tool_list_start|>" in prompt and prompt.index('"get_weather"') < prompt.index("Weather in Paris?")
    assert '"Calendar.create_event"' in prompt and '"Current weather in a city"' in prompt

    code, out, err, _ = _generate([*args, "--json"], script, monkeypatch, capsys)
    data = json.loads(out)
    assert (code, err) == (0, "")
    assert list(data) == ["text", "reasoning", "tool_calls", "finish_reason", "model", "stats"]
    assert data["text"] == "Let me check.\n" and data["finish_reason"] == "tool_calls"
    # generation stopped at the block's end marker
    assert data["stats"]["generated_tokens"] == len(head)
    calls = data["tool_calls"]
    assert [c["type"] for c in calls] == ["function", "function"] and len({c["id"] for c in calls}) == 2
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"location": "Paris", "unit": None}), ("Calendar.create_event", {"title": 'Café "fête"'})]


def test_without_tools_the_same_output_prints_as_it_always_did(chat_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    script = _ids(chat_ckpt, "Let me check.\n", "<|tool_call_start|>", CALLS, "<|tool_call_end|>", " done")
    code, out, err, prompts = _generate([str(chat_ckpt), "-p", "hi"], script, monkeypatch, capsys)
    # the markers are special tokens, skipped as ever; the call list is just text
    assert (code, out, err) == (0, "Let me check.\n" + CALLS + " done\n", "")
    code, out, err, _ = _generate([str(chat_ckpt), "-p", "hi", "--json"], script, monkeypatch, capsys)
    assert "tool_calls" not in json.loads(out) and json.loads(out)["finish_reason"] == "stop"


def test_a_thinking_model_calls_after_its_reasoning(think_ckpt: Path, tools_file: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    script = _ids(think_ckpt, "<think>", "\nI need the weather tool.\n", "</think>", "\n\n", "<|tool_call_start|>",
                  '[{"name": "get_weather", "arguments": {"location": "東京"}}]', "<|tool_call_end|>")
    args = [str(think_ckpt), "-p", "Weather in Tokyo?", "--tools", str(tools_file)]
    code, out, err, _ = _generate([*args, "--think", "show"], script, monkeypatch, capsys)
    assert (code, out, err) == (0, "", 'I need the weather tool.\ntool call: get_weather(location="東京")\n')
    code, out, err, _ = _generate([*args, "--json"], script, monkeypatch, capsys)
    data = json.loads(out)
    assert (data["text"], data["reasoning"], data["finish_reason"]) == ("", "I need the weather tool.", "tool_calls")
    assert json.loads(data["tool_calls"][0]["function"]["arguments"]) == {"location": "東京"}


def test_a_block_that_does_not_parse_is_shown_as_text(chat_ckpt: Path, tools_file: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    script = _ids(chat_ckpt, "<|tool_call_start|>", "[get_weather(location=Paris]", "<|tool_call_end|>", " sorry")
    args = [str(chat_ckpt), "-p", "hi", "--tools", str(tools_file)]
    code, out, err, _ = _generate(args, script, monkeypatch, capsys)
    assert (code, out) == (0, "<|tool_call_start|>[get_weather(location=Paris]<|tool_call_end|> sorry\n")
    assert err.startswith("note: a tool-call block did not parse (") and err.endswith("; it is shown as text\n")
    assert err.count("\n") == 1
    code, out, err, _ = _generate([*args, "--json"], script, monkeypatch, capsys)
    data = json.loads(out)
    assert (data["tool_calls"], data["finish_reason"]) == ([], "stop")
    assert data["text"] == "<|tool_call_start|>[get_weather(location=Paris]<|tool_call_end|> sorry"


@pytest.mark.slow
def test_tools_with_a_plain_reply_stop_strings_and_an_unclosed_block(chat_ckpt: Path, tools_file: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    args = [str(chat_ckpt), "-p", "hi", "--tools", str(tools_file), "--json"]
    code, out, _, _ = _generate(args, _ids(chat_ckpt, "No tool needed: 4."), monkeypatch, capsys)
    data = json.loads(out)
    assert (data["text"], data["tool_calls"], data["finish_reason"]) == ("No tool needed: 4.", [], "stop")
    # Text held back as the start of a stop string is printed when a call ends the reply.
    script = _ids(chat_ckpt, "Off to Par", "<|tool_call_start|>", '[get_weather(location="Paris")]',
                  "<|tool_call_end|>")
    code, out, _, _ = _generate([*args, "--stop", "Paris!"], script, monkeypatch, capsys)
    data = json.loads(out)
    assert (data["text"], data["finish_reason"], len(data["tool_calls"])) == ("Off to Par", "tool_calls", 1)
    # A stop string inside a call's arguments does not end the reply.
    code, out, _, _ = _generate([*args, "--stop", "Paris"], script, monkeypatch, capsys)
    assert json.loads(out)["finish_reason"] == "tool_calls"
    # The end marker never came, but the call is whole: it is still a call.
    code, out, _, _ = _generate(args, _ids(chat_ckpt, "<|tool_call_start|>", '[get_weather(location="Rome")]'),
                                monkeypatch, capsys)
    data = json.loads(out)
    assert (data["text"], data["finish_reason"]) == ("", "tool_calls")
    assert json.loads(data["tool_calls"][0]["function"]["arguments"]) == {"location": "Rome"}


@pytest.mark.parametrize(("content", "expected"), [
    (None, "cannot read the tools file"),
    ("[{\"name\": ", "not valid JSON"),
    ('{"name": "f"}', "not a JSON object"),
    ('[{"type": "function", "function": {"description": "no name"}}]', "tool 1 has no function name"),
    ('[{"name": "f"}, "g"]', "tool 2 has no function name"),
    ('[{"name": "f", "parameters": []}]', "tool 1 (f): parameters must be a JSON schema object"),
    ('[{"type": "retrieval", "function": {"name": "f"}}]', "tool 1 has type 'retrieval'"),
])
def test_a_bad_tools_file_is_one_line(content: str | None, expected: str, chat_ckpt: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    code, out, err, prompts = _generate([str(chat_ckpt), "-p", "hi", "--tools", str(path)], [], monkeypatch, capsys)
    assert (code, out, prompts) == (2, "", [])
    assert err.startswith(f"error: {path}: ") and expected in err and err.count("\n") == 1
    assert "expected a JSON list of function tools" in err


def test_tools_are_refused_with_raw(chat_ckpt: Path, tools_file: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    code, out, err, prompts = _generate([str(chat_ckpt), "-p", "hi", "--raw", "--tools", str(tools_file)], [],
                                        monkeypatch, capsys)
    assert (code, out, prompts) == (2, "", []) and err.count("\n") == 1 and "--raw" in err and "--tools" in err
