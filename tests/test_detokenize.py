"""Streaming text out of the generator: detokenizer and stop strings."""

from __future__ import annotations

import random

import pytest

from lfm2cli.text.detokenize import StreamingDetokenizer
from lfm2cli.text.stops import StopMatcher
from lfm2cli.text.tokenizer import Tokenizer, load_tokenizer
from tests.tiny_tokenizer import add_think_tokens, make_tokenizer

TEXTS = [
    "Café 🙂 日本語のテキスト 👍🏽 🇫🇷 done.",
    "東京は日本の首都です。北京是中国的首都。",
    "🤖🐍🎉❤️ emoji only 🚀🌍",
    "plain ASCII text, nothing special",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    d = StreamingDetokenizer(tok, skip_special_tokens=skip)
    return [d.add(i) for i in ids] + [d.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_never_emits_broken_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text


def test_test_text_really_splits_characters(tok: Tokenizer) -> None:
    # Guard for the test above: some single tokens must hold only part of a character.
    ids = tok.encode(TEXTS[0] + TEXTS[2])
    assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nSalut 🙂<|im_end|>")
    assert 6 in ids and 7 in ids
    assert "".join(stream(tok, ids)) == "assistant\nSalut 🙂"
    assert "".join(stream(tok, ids, skip=False)) == "<|im_start|>assistant\nSalut 🙂<|im_end|>"


def test_random_token_streams_concatenate_to_decode(tok: Tokenizer) -> None:
    # Random ids produce invalid UTF-8 too; whatever comes out must still add up to decode().
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        for skip in (True, False):
            assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


class CountingTokenizer:
    """The real tokenizer, recording how many ids each decode call is given."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner, self.sizes = inner, []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decodes_a_small_window(tok: Tokenizer) -> None:
    text = " ".join(TEXTS) * 20
    ids = tok.encode(text)
    spy = CountingTokenizer(tok)
    d = StreamingDetokenizer(spy)
    out = "".join(d.add(i) for i in ids) + d.flush()
    assert out == text
    assert len(ids) > 500
    assert max(spy.sizes) <= 8  # bounded by the longest split character, not the sequence length
    assert len(spy.sizes) <= 2 * len(ids) + 1


# --- stop strings ---------------------------------------------------------------------------------


def test_stop_split_across_feeds() -> None:
    m = StopMatcher(["<|im_end|>"])
    assert m.feed("Hello <|") == ("Hello ", False)
    assert m.feed("im_e") == ("", False)
    assert m.feed("nd|> ignored") == ("", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_partial_match_released_when_it_diverges() -> None:
    m = StopMatcher(["User:"])
    assert m.feed("Dear Use") == ("Dear ", False)
    assert m.feed("r X") == ("User X", False)
    assert m.feed("Us") == ("", False)
    assert m.flush() == "Us"


def test_earliest_stop_wins_and_text_before_is_kept() -> None:
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("one\n\ntwo END") == ("one", True)
    assert StopMatcher(["stop"]).feed("stop right away") == ("", True)


def test_no_stops_pass_through() -> None:
    m = StopMatcher(["", ""])
    assert m.feed("abc<|") == ("abc<|", False)
    assert m.flush() == ""


@pytest.mark.parametrize("seed", range(20))
def test_any_chunking_never_emits_stop(seed: int) -> None:
    rng = random.Random(seed)
    stops = ["</answer>", "STOP", "aab"]
    body = "".join(rng.choice(["a", "b", "<", "/", "ans", "</ans", "ST", "STO", " "]) for _ in range(40))
    stop = rng.choice(stops)
    text = body + stop + " trailing text"
    cut = min(i for i in (text.find(s) for s in stops) if i >= 0)
    m = StopMatcher(stops)
    emitted, hit, pos = [], False, 0
    while pos < len(text) and not hit:
        n = rng.randrange(1, 6)
        piece, hit = m.feed(text[pos:pos + n])
        emitted.append(piece)
        pos += n
    out = "".join(emitted) + ("" if hit else m.flush())
    assert hit
    assert out == text[:cut]
    assert not any(s in out for s in stops)


@pytest.fixture(scope="module")
def think_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = make_tokenizer(tmp_path_factory.mktemp("think"))
    add_think_tokens(path)
    return load_tokenizer(path)


def test_kept_markers_come_through_while_other_special_tokens_are_skipped(think_tok: Tokenizer) -> None:
    from lfm2cli.runs.prompt import thinking_markers

    keep = thinking_markers(think_tok)
    assert sorted(keep.values()) == ["</think>", "<think>"]
    text = "<think>\nCafé 🙂 日本語</think>\n\nSalut 🇫🇷<|im_end|>"
    ids = think_tok.encode(text)
    assert all(i in ids for i in keep) and 7 in ids  # each marker is one token, as is <|im_end|>
    d = StreamingDetokenizer(think_tok, keep=keep)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "<think>\nCafé 🙂 日本語</think>\n\nSalut 🇫🇷"
    # without `keep` the markers vanish, as every special token does
    assert "".join(stream(think_tok, ids)) == "\nCafé 🙂 日本語\n\nSalut 🇫🇷"
    # not skipping at all: every special token is written once, `keep` changes nothing
    d = StreamingDetokenizer(think_tok, skip_special_tokens=False, keep=keep)
    assert "".join([d.add(i) for i in ids] + [d.flush()]) == text


def test_random_streams_with_kept_markers_add_up(think_tok: Tokenizer) -> None:
    from lfm2cli.runs.prompt import thinking_markers

    keep = thinking_markers(think_tok)
    rng = random.Random(1)
    for _ in range(30):
        # one id in five a marker, so that markers meet split characters and each other
        ids = [rng.choice(list(keep)) if rng.random() < 0.2 else rng.randrange(think_tok.vocab_size)
               for _ in range(rng.randrange(1, 60))]
        d = StreamingDetokenizer(think_tok, keep=keep)
        # what decode with the markers spelled out gives: the runs between them decoded apart
        expected, run = "", []
        for i in ids:
            if i in keep:
                expected += think_tok.decode(run) + keep[i]
                run = []
            else:
                run.append(i)
        expected += think_tok.decode(run)
        assert "".join([d.add(i) for i in ids] + [d.flush()]) == expected
