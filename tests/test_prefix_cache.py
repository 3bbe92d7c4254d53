"""PrefixCache: a cache reused by the longest common prefix, on the real tiny model (its logits after a sync must
be those of a cold prefill of the same ids)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lfm2cli.decoding.prefix_cache import PrefixCache, common_prefix


@pytest.fixture(scope="module")
def lm(dense_ckpt: Path):
    from lfm2cli.loading.loader import load

    return load(dense_ckpt, device="cpu", dtype="float32")


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(8, 500, (n,), generator=g).tolist()


def _cold(lm, ids: list[int]) -> torch.Tensor:
    return lm.model(torch.tensor([ids]), lm.model.new_cache())


def _fed(lm, pc: PrefixCache, ids: list[int], chunk: int = 512) -> tuple[torch.Tensor, int]:
    """Sync to `ids`, prefill what is missing and return the logits after the last id and how many ids ran."""
    new = pc.sync(ids)
    pc.extend(lm.model, new[:-1], chunk=chunk)
    logits = lm.model(torch.tensor([new[-1:]]), pc.cache)
    pc.commit(ids)
    return logits, len(new)


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [6]) == 0


def test_a_resent_sequence_plus_new_ids_feeds_only_the_new_ones(lm) -> None:
    pc = PrefixCache(lm.model.new_cache())
    first = _ids(40, 0)
    logits, ran = _fed(lm, pc, first)
    assert ran == 40 and torch.allclose(logits, _cold(lm, first), atol=1e-5)
    pc.snapshot()
    longer = first + _ids(9, 1)
    logits, ran = _fed(lm, pc, longer)
    assert ran == 9  # only the new ids
    assert torch.allclose(logits, _cold(lm, longer), atol=1e-5)
    assert pc.ids == longer and pc.cache.pos == len(longer)


def test_the_same_sequence_again_feeds_its_last_id_only(lm) -> None:
    pc = PrefixCache(lm.model.new_cache())
    ids = _ids(30, 2)
    _fed(lm, pc, ids)
    logits, ran = _fed(lm, pc, ids)  # the snapshot extend took before the last id is where it goes back to
    assert ran == 1 and torch.allclose(logits, _cold(lm, ids), atol=1e-5)


def test_a_divergence_goes_back_to_the_latest_snapshot_below_it(lm) -> None:
    pc = PrefixCache(lm.model.new_cache())
    ids = _ids(50, 3)
    _fed(lm, pc, ids, chunk=16)  # a snapshot after each chunk of the 49 ids before the last
    assert pc.snapshot_positions == [0, 16, 32, 48, 49]
    other = ids[:40] + _ids(5, 4)  # diverges at 40: back to 32, then 13 ids to run
    logits, ran = _fed(lm, pc, other, chunk=16)
    assert ran == len(other) - 32
    assert torch.allclose(logits, _cold(lm, other), atol=1e-5)
    assert all(p <= len(other) for p in pc.snapshot_positions)  # the stale ones above 32 are gone


def test_marks_add_snapshots_where_the_next_sequence_will_diverge(lm) -> None:
    pc = PrefixCache(lm.model.new_cache())
    ids = _ids(40, 11)
    pc.sync(ids)
    pc.extend(lm.model, ids[:30], chunk=512, marks=[0, 7, 25, 30, 99])  # only those inside the ids count
    assert pc.snapshot_positions == [0, 7, 25, 30]
    other = ids[:27] + _ids(4, 12)
    logits, ran = _fed(lm, pc, other)
    assert ran == len(other) - 25 and torch.allclose(logits, _cold(lm, other), atol=1e-5)
    pc.extend(lm.model, _ids(20, 13), chunk=8, marks=[len(other) + 3])  # marks count from the sequence's start
    assert pc.snapshot_positions[-4:] == [len(other) + 3, len(other) + 11, len(other) + 19, len(other) + 20]


def test_a_different_sequence_starts_from_the_empty_cache(lm) -> None:
    pc = PrefixCache(lm.model.new_cache())
    _fed(lm, pc, _ids(20, 5))
    other = _ids(12, 6)
    assert other[0] != _ids(20, 5)[0]
    logits, ran = _fed(lm, pc, other)
    assert ran == 12 and torch.allclose(logits, _cold(lm, other), atol=1e-5)


def test_a_prefill_told_to_stop_keeps_its_finished_chunks(lm) -> None:
    pc = PrefixCache(lm.model.new_cache())
    ids = _ids(64, 7)
    new = pc.sync(ids)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2  # two chunks, then stop

    assert pc.extend(lm.model, new[:-1], chunk=10, stop=stop) == 20
    assert pc.ids == ids[:20] and pc.cache.pos == 20
    logits, ran = _fed(lm, pc, ids)  # the next request resumes where the cut prefill stopped
    assert ran == 44 and torch.allclose(logits, _cold(lm, ids), atol=1e-5)


def test_a_forward_that_fails_half_way_is_recovered(lm) -> None:
    """A failure inside the layers leaves conv states half updated; extend goes back to its last snapshot."""
    pc = PrefixCache(lm.model.new_cache())
    ids = _ids(30, 8)
    _fed(lm, pc, ids[:20])
    pc.snapshot()

    def fail(*_):
        raise RuntimeError("injected failure in layer 2")

    hook = lm.model.model.layers[2].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            pc.extend(lm.model, ids[20:])
    finally:
        hook.remove()
    assert pc.ids == ids[:20] and pc.cache.pos == 20
    logits, ran = _fed(lm, pc, ids)
    assert ran == 10 and torch.allclose(logits, _cold(lm, ids), atol=1e-5)


def test_snapshots_are_thinned_evenly_keeping_the_first_and_the_latest(lm) -> None:
    pc = PrefixCache(lm.model.new_cache(), max_snapshots=5)
    ids = _ids(100, 9)
    pc.sync(ids)
    pc.extend(lm.model, ids, chunk=10)  # 11 snapshots asked for, 5 kept
    pos = pc.snapshot_positions
    assert len(pos) == 5 and pos[0] == 0 and pos[-1] == 100
    assert max(b - a for a, b in zip(pos, pos[1:], strict=False)) <= 40  # spread out, not just the latest five


def test_commit_and_snapshot_refuse_a_sequence_the_cache_does_not_hold(lm) -> None:
    pc = PrefixCache(lm.model.new_cache())
    ids = _ids(10, 10)
    _fed(lm, pc, ids)
    with pytest.raises(ValueError, match="does not continue"):
        pc.commit([ids[0] + 1, *ids[1:]])
    lm.model(torch.tensor([[3]]), pc.cache)  # the cache moved on without a commit
    with pytest.raises(ValueError, match="commit first"):
        pc.snapshot()
    pc.commit([*ids, 3])
    pc.snapshot()
    with pytest.raises(ValueError):
        pc.sync([])
