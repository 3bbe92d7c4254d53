"""`lfm2 generate` and the generation loop under it, end to end on tiny checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lfm2cli.cli import app
from lfm2cli.errors import GenerationError
from lfm2cli.generation import GenerationStats, generate
from lfm2cli.loading import load
from lfm2cli.sampling import Sampler, SamplingParams
from lfm2cli.textgen import TextRun, prompt_ids
from tests.tiny import reference_model

ANSI = re.compile(r"\x1b\[")
runner = CliRunner()


def lfm2(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm2cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("fixture", ["chat_ckpt", "chat_moe_ckpt"])
def test_greedy_raw_matches_reference_generate(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    lm = load(path, device="cpu", dtype="float32")
    text = "The quick brown fox jumps over the lazy dog"
    ids = prompt_ids(lm, text, raw=True)
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


def test_stop_string_is_never_printed(chat_ckpt: Path) -> None:
    lm = load(chat_ckpt, device="cpu", dtype="float32")
    ids = prompt_ids(lm, "Tell me a story")
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    full = TextRun(lm, ids, greedy, 40).run()
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    run = TextRun(lm, ids, greedy, 40, stops=[stop])
    pieces = list(run.pieces())
    assert "".join(pieces) == full[: full.index(stop)]
    assert stop not in run.text and run.stats.finish_reason == "stop"


def test_finish_reasons_and_stats(chat_ckpt: Path) -> None:
    lm = load(chat_ckpt, device="cpu", dtype="float32")
    ids = prompt_ids(lm, "Hello")
    run = TextRun(lm, ids, SamplingParams(temperature=0), 5)
    run.run()
    s = run.stats
    assert s.finish_reason == "length" and s.generated_tokens == 5 and len(run.tokens) == 5
    assert s.prompt_tokens == len(ids) and s.ttft_s > 0 and s.peak_memory_bytes > 0
    # an EOS id forced by a sampler that always picks it ends with "stop" and yields nothing
    stats = GenerationStats()
    out = list(generate(lm.model, ids, sampler=lambda logits, seen: 7, max_tokens=5, eos_ids=[7], stats=stats))
    assert out == [] and stats.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(chat_ckpt: Path) -> None:
    lm = load(chat_ckpt, device="cpu", dtype="float32")
    ids = prompt_ids(lm, "Hello")
    p = SamplingParams(temperature=1.0, min_p=0.0, seed=42)
    a = list(generate(lm.model, ids, sampler=Sampler(p), max_tokens=20))
    b = list(generate(lm.model, ids, sampler=Sampler(p), max_tokens=20))
    assert a == b


def test_prompt_longer_than_context_fails_before_compute(chat_ckpt: Path) -> None:
    result = runner.invoke(app, ["generate", str(chat_ckpt), "--prompt", "word " * 3000, "--device", "cpu"])
    # CliRunner bypasses main()'s error boundary, so the error arrives as the exception itself
    assert isinstance(result.exception, GenerationError)
    assert "context holds 2048" in str(result.exception)


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
        (no_tok / f).symlink_to(chat_ckpt / f)
    r = lfm2("generate", str(no_tok), "--prompt", "hi", stdin="")
    assert r.returncode == 1 and "tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = lfm2("generate", str(chat_ckpt), "--prompt", "hi", "--temperature", "-1", stdin="")
    assert bad.returncode == 2


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
