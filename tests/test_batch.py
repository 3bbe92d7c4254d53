"""`decode_batch`: several sequences, each in its own cache, decoded one token each in one step. A sequence's
logits are the same bits whether it is decoded alone (the one-token step) or among others, at every ISA level,
for bf16, int8 and int4 weights, dense and MoE, with sequences joining and leaving between steps; without the
native code the batch is a loop of single steps. The generation loop prefills all of a prompt but its last token
and runs that one through the step, as serve does, so generate, serve alone and serve batched agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lfm2cli.decoding.batch import decode_batch
from lfm2cli.decoding.loop import decode_tokens
from lfm2cli.kernels import native
from lfm2cli.kernels.native_step import NativeDecoder
from lfm2cli.loading.loader import load
from lfm2cli.system import cpu
from tests.helpers import native_at_level, prompt
from tests.tiny import make_checkpoint

# which sequences step together, step by step: batches of 1, 3 and 8, sequences joining and leaving, in any order
SCHEDULE = [[0], [2, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1], [3], [4, 0, 6], [1, 5, 2, 7, 0, 3, 6, 4],
            [6, 1, 3], [5]]
LENGTHS = [1, 9, 30, 2, 17, 5, 40, 12]  # each sequence's prompt: a one-token prompt prefills nothing


@pytest.fixture(scope="module", params=cpu.native_levels() or ["none"])
def kernel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The native code at one ISA level this CPU executes (AVX2 forced on an AVX512 CPU included)."""
    with native_at_level(request.param, tmp_path_factory.mktemp("kernels")):
        if not native.ready():
            pytest.skip(f"native code {native.why_not()}")
        yield request.param


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense checkpoint whose products take 1024 inputs: bf16 sums cut in chunks (AVX2)."""
    return make_checkpoint(tmp_path_factory.mktemp("wide"), hidden_size=1024, num_attention_heads=8,
                           num_key_value_heads=4)


def prefilled(model, lengths: list[int]) -> list:
    """One cache per prompt, holding all of it but its last token; and those last tokens."""
    caches, last = [], []
    for i, n in enumerate(lengths):
        ids = prompt(n, seed=i + 1)
        cache = model.new_cache()
        if n > 1:
            model(ids[:, :-1], cache)
        caches.append(cache)
        last.append(int(ids[0, -1]))
    return caches, last


def check_batching(model, schedule: list[list[int]] = SCHEDULE, lengths: list[int] = LENGTHS) -> None:
    """Every sequence decoded alone (greedy) and in the schedule's batches: the same logits, bit for bit."""
    alone, alone_tok = prefilled(model, lengths)
    batched, batch_tok = prefilled(model, lengths)
    for active in schedule:
        logits = decode_batch(model, [batch_tok[i] for i in active], [batched[i] for i in active])
        assert logits.dtype == torch.float32 and logits.shape == (len(active), model.config.vocab_size)
        for row, i in zip(logits, active, strict=True):
            ref = model(torch.tensor([[alone_tok[i]]]), alone[i])[0]
            assert torch.equal(row, ref), f"sequence {i} in a batch of {len(active)}"
            alone_tok[i] = batch_tok[i] = int(ref.argmax())
    assert [c.pos for c in alone] == [c.pos for c in batched]


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_batched_steps_give_each_sequence_its_own_bits(kernel: str, dense_ckpt: Path, moe_ckpt: Path,
                                                       quantize: str | None) -> None:
    for path in (dense_ckpt, moe_ckpt):
        model = load(path, device="cpu", dtype="bfloat16", tokenizer=False, quantize=quantize).model
        assert isinstance(model.decode_step, NativeDecoder) and model.decode_step.layers is not None
        check_batching(model)


def test_wide_products_too(kernel: str, wide_ckpt: Path) -> None:
    model = load(wide_ckpt, device="cpu", dtype="bfloat16", tokenizer=False).model
    check_batching(model, SCHEDULE[:4])


def test_caches_grow_inside_a_batch(kernel: str, dense_ckpt: Path) -> None:
    """A cache at the end of its storage grows before the step reads its pointers."""
    model = load(dense_ckpt, device="cpu", dtype="bfloat16", tokenizer=False).model
    caches, ref = [model.new_cache(), model.new_cache()], [model.new_cache(), model.new_cache()]
    for c, n in zip(caches + ref, [256, 3, 256, 3], strict=True):
        model(prompt(n), c)
    assert caches[0].pos == caches[0].capacity
    got = decode_batch(model, [5, 7], caches)
    want = torch.cat([model(torch.tensor([[t]]), c) for t, c in zip([5, 7], ref, strict=True)])
    assert torch.equal(got, want) and caches[0].capacity > 256 and [c.pos for c in caches] == [257, 4]


def test_without_the_native_code_the_batch_is_a_loop(dense_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LFM2_NATIVE", "0")
    native.reset()
    try:
        model = load(dense_ckpt, device="cpu", dtype="bfloat16", tokenizer=False).model
        assert not isinstance(model.decode_step, NativeDecoder)
        check_batching(model, SCHEDULE[:4])
    finally:
        native.reset()


def test_bad_batches_are_refused(dense_ckpt: Path) -> None:
    model = load(dense_ckpt, device="cpu", dtype="bfloat16", tokenizer=False).model
    cache = model.new_cache()
    with pytest.raises(ValueError):
        decode_batch(model, [1, 2], [cache])
    with pytest.raises(ValueError):
        decode_batch(model, [1, 2], [cache, cache])
    assert decode_batch(model, [], []).shape == (0, model.config.vocab_size)


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_generate_and_batched_serving_pick_the_same_tokens(kernel: str, dense_ckpt: Path, moe_ckpt: Path,
                                                           quantize: str | None) -> None:
    """decode_tokens (generate) against the serving convention: prompts prefilled but their last token, then
    greedy steps for three sequences batched together."""
    for path in (dense_ckpt, moe_ckpt):
        model = load(path, device="cpu", dtype="bfloat16", tokenizer=False, quantize=quantize).model
        lengths, steps = [1, 14, 33], 16
        caches, toks = prefilled(model, lengths)
        served: list[list[int]] = [[] for _ in lengths]
        for _ in range(steps):
            logits = decode_batch(model, toks, caches)
            toks = [int(row.argmax()) for row in logits]
            for out, t in zip(served, toks, strict=True):
                out.append(t)
        for i, n in enumerate(lengths):
            ids = prompt(n, seed=i + 1)[0].tolist()
            generated = list(decode_tokens(model, ids, sampler=lambda logits, _seen: int(logits.argmax()),
                                           max_tokens=steps))
            assert generated == served[i]
