"""The reasoning/answer split of streamed replies, and the thinking budget."""

from __future__ import annotations

import random

import pytest

from lfm2cli.reply.thinking import (
    CLOSE_TEXT,
    Answer,
    Reasoning,
    ThinkingBudget,
    ThinkingSplitter,
    opened_by_prompt,
)


def split(chunks: list[str], opened: bool = False) -> tuple[list, ThinkingSplitter]:
    s = ThinkingSplitter(opened=opened)
    pieces = []
    for batch in [*(s.feed(c) for c in chunks), s.close()]:
        # Within one call pieces are non-empty and neighbours differ in kind (same kinds are merged).
        assert all(batch) and all(type(a) is not type(b) for a, b in zip(batch, batch[1:], strict=False))
        pieces += batch
    return pieces, s


def joined(pieces: list) -> tuple[str, str]:
    return ("".join(p for p in pieces if isinstance(p, Reasoning)), "".join(p for p in pieces if isinstance(p, Answer)))


def test_model_opens_the_block_itself() -> None:
    pieces, s = split(["<think>\nAdd them: 2 + 2 = 4.\n</think>\n\nThe answer is 4."])
    assert pieces == [Reasoning("Add them: 2 + 2 = 4."), Answer("The answer is 4.")]
    assert [type(p) for p in pieces] == [Reasoning, Answer]
    assert (s.reasoning_text, s.answer_text, s.state) == ("Add them: 2 + 2 = 4.", "The answer is 4.", "answer")


def test_prompt_already_opened_the_block() -> None:
    pieces, s = split(["Add them.\n</think>\n\n4"], opened=True)
    assert pieces == [Reasoning("Add them."), Answer("4")]
    # Without `opened` the same text is an answer that happens to contain the tag.
    _, plain = split(["Add them.\n</think>\n\n4"])
    assert (plain.reasoning_text, plain.answer_text) == ("", "Add them.\n</think>\n\n4")


def test_opened_splitter_starts_in_reasoning() -> None:
    s = ThinkingSplitter(opened=True)
    assert s.state == "reasoning"
    assert s.feed("Hmm") == [Reasoning("Hmm")]
    assert ThinkingSplitter().state == "start"


def test_no_thinking_is_the_text_unchanged() -> None:
    text = "\n  Hello, **world**.\n\nA < b and <thing> too.  \n"
    pieces, s = split([text])
    assert pieces == [Answer(text)]
    assert (s.reasoning_text, s.answer_text, s.state) == ("", text, "answer")


def test_text_is_released_as_soon_as_it_cannot_be_a_marker() -> None:
    s = ThinkingSplitter()
    assert s.feed("<th") == [] and s.state == "start"
    assert s.feed("ink>") == [] and s.state == "reasoning"
    assert s.feed("I think a<b") == [Reasoning("I think a<b")]
    assert s.feed(" and </th") == [Reasoning(" and")]  # the space may sit before `</think>`: held with it
    assert s.feed("e end") == [Reasoning(" </the end")]
    assert s.feed("</think>\n") == [] and s.state == "answer"
    assert s.feed("\n") == []
    assert s.feed("Yes") == [Answer("Yes")]
    assert s.feed(" </think> <think>") == [Answer(" </think> <think>")]  # no more markers in the answer
    # Without a block the first character that cannot start `<think>` releases everything.
    t = ThinkingSplitter()
    assert t.feed("  <") == []
    assert t.feed("b>") == [Answer("  <b>")]


def test_whitespace_around_markers_is_dropped_but_raw_text_keeps_it() -> None:
    chunks = ["\n<think>", "\n\n  ", "step one\n", "\nstep two  \n", "</think>", "\n\n", " Done.\n"]
    pieces, s = split(chunks)
    assert joined(pieces) == ("step one\n\nstep two", "Done.\n")
    assert s.raw_text == "".join(chunks)


def test_a_later_think_is_answer_text() -> None:
    pieces, s = split(["<think>a</think>b <think>c</think> d"])
    assert pieces == [Reasoning("a"), Answer("b <think>c</think> d")]
    # Text before the tag means the reply did not open with a block.
    _, s = split(["Sure. <think>x</think> y"])
    assert (s.reasoning_text, s.answer_text) == ("", "Sure. <think>x</think> y")


@pytest.mark.parametrize("opened", [False, True])
def test_unclosed_block_is_all_reasoning(opened: bool) -> None:
    text = ("" if opened else "<think>") + "Still working on it, 7 × 6 = 42 </thi"
    pieces, s = split([text], opened=opened)
    assert joined(pieces) == ("Still working on it, 7 × 6 = 42 </thi", "")
    assert (s.answer_text, s.state) == ("", "reasoning")


@pytest.mark.parametrize("text", ["<think></think>4", "<think>\n\n</think>\n\n4", "<think> </think>4"])
def test_empty_reasoning(text: str) -> None:
    pieces, s = split([text])
    assert pieces == [Answer("4")]
    assert (s.reasoning_text, s.answer_text) == ("", "4")


def test_edge_endings() -> None:
    assert split([])[0] == [] and split([])[1].state == "answer"
    pieces, s = split(["  <thi"])  # a marker that never completed is text
    assert pieces == [Answer("  <thi")]
    pieces, s = split(["<think>x</think>\n\n"])  # nothing after the block
    assert pieces == [Reasoning("x")] and s.answer_text == ""


def test_close_is_final() -> None:
    s = ThinkingSplitter()
    assert s.feed("<think>x</th") == [Reasoning("x")]
    assert s.close() == [Reasoning("</th")] and s.reasoning_text == "x</th"
    assert s.close() == []
    with pytest.raises(ValueError):
        s.feed("more")


def test_pieces_of_one_kind_are_merged_and_never_empty() -> None:
    s = ThinkingSplitter()
    out = s.feed("<think>a</think>b")
    assert out == [Reasoning("a"), Answer("b")]
    assert all(out) and all(type(p) in (Reasoning, Answer) for p in out)
    assert repr(out[0]) == "Reasoning('a')" and isinstance(out[1], str)


CASES = [
    (["<think>\nLet me see: ünïcödé 日本語 🙂.\n</think>\n\nAnswer: 🙂 <b>ok</b>\n"], False),
    (["Reasoning with </thin and </ and <think> inside.\n</think>\n\n\tFinal."], True),
    (["<think>a</think></think>"], False),
    (["  \n<think>x\n\n"], False),
    (["<thinking>not a block</thinking>"], False),
    (["<<think>>"], False),
    (["<think></think>"], False),
    (["No thinking at all, just </think> text."], False),
    (["</think>answer"], True),
    (["plain"], True),
]


@pytest.mark.parametrize("chunks,opened", CASES)
def test_any_chunking_gives_the_same_split(chunks: list[str], opened: bool) -> None:
    text = "".join(chunks)
    whole, ref = split([text], opened)
    expected = joined(whole)
    assert expected == (ref.reasoning_text, ref.answer_text)
    chunkings = [list(text)]  # one character at a time
    chunkings += [[text[:i], text[i:]] for i in range(len(text) + 1)]  # every single boundary
    rng = random.Random(1234)
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text), 8))))
        chunkings.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    for chunking in chunkings:
        pieces, s = split(chunking, opened)
        assert joined(pieces) == expected, chunking
        assert (s.reasoning_text, s.answer_text, s.state) == (*expected, ref.state), chunking
        assert s.raw_text == text


def test_opened_by_prompt() -> None:
    gen = "<|startoftext|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not opened_by_prompt(gen)
    assert opened_by_prompt(gen + "<think>")
    assert opened_by_prompt(gen + "<think>\n")
    assert not opened_by_prompt(gen + "<think></think>\n")  # a template that turns thinking off
    assert not opened_by_prompt(gen + "<think>\n\n</think>\n\n")
    # A past reply cut off inside its block leaves nothing open for the new turn.
    past = ("<|startoftext|><|im_start|>assistant\n<think>unfinished<|im_end|>\n"
            "<|im_start|>user\nWhat is <think>?<|im_end|>\n<|im_start|>assistant\n")
    assert not opened_by_prompt(past)
    assert opened_by_prompt("Once upon a time <think>")  # --raw prompts have no turns
    assert not opened_by_prompt("")


def test_budget_when_the_prompt_opened_the_block() -> None:
    b = ThinkingBudget(3, opened=True)
    assert b.inside and not b.due
    assert b.observe(101, "One") is False
    assert b.observe(102, " two") is False
    assert b.observe(103, " three") is True  # third token inside: spent
    assert b.used == 3 and b.due
    assert b.force_close() == CLOSE_TEXT == "</think>\n"
    assert b.forced and not b.inside and not b.due
    assert b.observe(104, "Answer") is False and b.used == 3  # answer tokens do not count
    with pytest.raises(ValueError):
        b.force_close()


def test_budget_when_the_model_opens_the_block() -> None:
    b = ThinkingBudget(2)
    assert not b.inside and not b.due
    assert b.observe(1, "<th") is False and b.used == 0
    assert b.observe(2, "ink>") is False and b.used == 0  # the opening marker is not reasoning
    assert b.inside
    assert b.observe(3, "a") is False
    assert b.observe(4, "b") is True


def test_budget_is_not_spent_when_the_model_closes_in_time() -> None:
    b = ThinkingBudget(3)
    decisions = [b.observe(i, t) for i, t in enumerate(["<think>", "x", "</think>", "\n", "y", "z", "w"])]
    assert decisions == [False] * 7
    assert b.used == 2 and not b.forced and not b.inside


def test_budget_without_thinking_never_counts() -> None:
    b = ThinkingBudget(0)
    assert [b.observe(i, t) for i, t in enumerate(["Hello", " there", "."])] == [False] * 3
    assert b.used == 0 and not b.due


def test_budget_zero_closes_before_the_first_token() -> None:
    assert ThinkingBudget(0, opened=True).due
    b = ThinkingBudget(0)
    assert b.observe(7, "<think>") is True  # close at once after the model opens


def test_budget_follows_marker_ids_when_their_text_is_skipped() -> None:
    # Detokenizers that skip special tokens give "" for the markers; their ids say where the block is.
    b = ThinkingBudget(5, open_id=900, close_id=901)
    assert b.observe(900, "") is False and b.inside
    assert b.observe(5, "x") is False and b.used == 1
    assert b.observe(901, "") is False and not b.inside and b.used == 2
    # Without the ids the same stream looks like an answer from the first token.
    blind = ThinkingBudget(5)
    blind.observe(900, "")
    blind.observe(5, "x")
    assert not blind.inside and blind.used == 0


def test_budget_rejects_negative() -> None:
    with pytest.raises(ValueError):
        ThinkingBudget(-1)


def test_budget_and_splitter_in_a_loop() -> None:
    """What a generation loop does: count each token, inject the close when due, split what is shown."""
    model = ["<think>", "\n", "Let", " me", " think", " more", " and", " more", "</think>", "\n\n", "Late."]
    budget, shown, injected = ThinkingBudget(4), ThinkingSplitter(), []
    stream = iter(enumerate(model))
    for i, text in stream:
        shown.feed(text)
        if budget.observe(i, text):
            close = budget.force_close()
            injected.append(close)
            shown.feed(close)
            # The model, now past its block, goes on with an answer.
            for t in ["\n", "Answer", "."]:
                shown.feed(t)
                assert budget.observe(-1, t) is False
            break
    shown.close()
    assert injected == ["</think>\n"]
    assert (shown.reasoning_text, shown.answer_text) == ("Let me think", "Answer.")
    assert budget.used == 4
