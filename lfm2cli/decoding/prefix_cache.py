"""The model cache of one token sequence, reused by the longest common prefix with the next one.

A chat client (`lfm2 chat`, or any client of `lfm2 serve`) sends the whole conversation every turn. The cache
holds `ids` (`cache.pos == len(ids)`); `sync(new_ids)` keeps what the two share and returns only the ids that
still have to run through the model. Keys and values below `pos` are never rewritten, so going back to a shorter
prefix needs only the small conv states at that position: a snapshot. Snapshots are taken where a caller says
(prompt ends, prefill chunks, every so many generated tokens); a divergence between two snapshots goes back to
the one below it and feeds the few ids in between again.

No model code runs here except `extend`, the chunked prefill that keeps a snapshot per chunk (so a prefill cut
short is still reusable).

`CachedReply` is how a reply uses the cache (`lfm2 chat` and `lfm2 serve` alike): sync, prefill all but the last
prompt id, snapshot, then commit what the generation loop fed, or go back to a safe state when it failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from lfm2cli.decoding.loop import PREFILL_CHUNK, prefill

MAX_SNAPSHOTS = 64  # conv states only: a few hundred KB each for the largest LFM2


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """A `HybridCache` and the ids it holds, with snapshots to rewind to.

    `sync(ids)` before each generation, `extend(model, ids)` to prefill, `commit(seq)` after the cache advanced
    by other means (the generation loop), `snapshot()` where a later request may diverge, `recover()` after a
    forward pass failed half-way."""

    def __init__(self, cache: Any, max_snapshots: int = MAX_SNAPSHOTS) -> None:
        if max_snapshots < 2:
            raise ValueError("a prefix cache needs room for at least two snapshots")
        self.cache = cache
        self.ids: list[int] = []
        self.max_snapshots = max_snapshots
        self._snapshots: list[Any] = []  # CacheSnapshot, in increasing `pos`
        self.reset()

    @property
    def snapshot_positions(self) -> list[int]:
        return [s.pos for s in self._snapshots]

    def sync(self, ids: Sequence[int]) -> list[int]:
        """Bring the cache to the longest usable prefix of `ids`; return the ids still to feed. At least one is
        always left: a reply needs the logits after the last prompt id, which only a forward pass gives."""
        if not ids:
            raise ValueError("sync needs at least one id")
        p = min(common_prefix(ids, self.ids), len(ids) - 1)
        if p < len(self.ids):
            self.rewind(p)
        elif not self._snapshots or self._snapshots[-1].pos != self.cache.pos:
            self.snapshot()  # where a prefill cut short comes back to
        return list(ids[len(self.ids):])

    def extend(self, model: Any, ids: Sequence[int], chunk: int = PREFILL_CHUNK,
               stop: Callable[[], bool] | None = None, marks: Sequence[int] = ()) -> int:
        """Prefill `ids` after what the cache holds, `chunk` at a time, with a snapshot after each chunk and at each
        of `marks` (positions in the whole sequence where a later one is likely to diverge, e.g. where a chat
        template's generation prompt begins). `stop()` is asked between chunks; returns how many ids were fed (all
        of them unless it said stop)."""
        base = len(self.ids)
        cuts = sorted(m - base for m in marks if 0 < m - base < len(ids))
        done = 0
        try:
            while done < len(ids):
                if stop is not None and stop():
                    break
                end = min([done + chunk, len(ids), *(c for c in cuts if c > done)])
                part = list(ids[done:end])
                prefill(model, part, self.cache, chunk)
                self.ids += part
                done += len(part)
                self.snapshot()
        except BaseException:
            self.recover()
            raise
        return done

    def commit(self, seq: Sequence[int]) -> None:
        """The cache advanced outside `extend` (a generation loop fed `seq` past `ids`): record that it now holds
        `seq[:cache.pos]`. `seq` must begin with `ids`."""
        pos = self.cache.pos
        if pos < len(self.ids) or len(seq) < pos or list(seq[:len(self.ids)]) != self.ids:
            raise ValueError("commit: the sequence does not continue what the cache holds")
        self.ids = list(seq[:pos])

    def snapshot(self) -> None:
        """Remember the state at the current position. Over the cap, the snapshot whose neighbours lie closest
        together goes, so what is kept stays spread over the sequence (the first and the latest always stay)."""
        if len(self.ids) != self.cache.pos:
            raise ValueError("snapshot: the cache position does not match the ids recorded; commit first")
        if self._snapshots and self._snapshots[-1].pos == self.cache.pos:
            self._snapshots.pop()
        self._snapshots.append(self.cache.snapshot())
        while len(self._snapshots) > self.max_snapshots:
            pos = [s.pos for s in self._snapshots]
            drop = min(range(1, len(pos) - 1), key=lambda i: pos[i + 1] - pos[i - 1])
            del self._snapshots[drop]

    def rewind(self, p: int) -> None:
        """Restore the latest snapshot at or below position `p` (always, even at the current position: the state
        may be half updated); without one, start from an empty cache."""
        usable = [s for s in self._snapshots if s.pos <= p]
        if not usable:
            self.reset()
            return
        snap = usable[-1]
        self.cache.restore(snap)
        self._snapshots = usable  # later ones describe positions that will be overwritten
        del self.ids[snap.pos:]

    def recover(self) -> None:
        """After a forward pass failed or was cut half-way: back to the last snapshot the ids allow."""
        self.rewind(len(self.ids))

    def reset(self) -> None:
        self.cache.reset()
        self.ids = []
        self._snapshots = [self.cache.snapshot()]  # the empty cache, so position 0 is always a rewind target


class CachedReply:
    """One reply generated on a `PrefixCache`: `ids` (the whole prompt) synced; `prefill()` feeds `new` but its last
    id, which the generation loop feeds itself (`last`) for fresh logits. Run the generation inside `generating()`,
    which records what the loop fed and puts the cache right when it failed. With `snapshot_every`, `after_token`
    takes a snapshot after the first generated token (the whole prompt cached: where a resent conversation diverges
    most often) and every that many tokens."""

    def __init__(self, prefix: PrefixCache, ids: Sequence[int], snapshot_every: int | None = None) -> None:
        self.prefix = prefix
        self.ids = list(ids)
        self.new = prefix.sync(self.ids)  # the ids the cache did not hold: what this reply prefills
        self.snapshot_every = snapshot_every

    @property
    def last(self) -> list[int]:
        return self.new[-1:]

    def prefill(self, model: Any, stop: Callable[[], bool] | None = None, marks: Sequence[int] = ()) -> None:
        """All of the prompt but its last id, then a snapshot: where a retry and a failed reply come back to."""
        self.prefix.extend(model, self.new[:-1], stop=stop, marks=marks)
        self.prefix.snapshot()

    def after_token(self, tokens: Sequence[int]) -> None:
        """Called with the reply's tokens after each one, before the model runs the next (see `TextRun`)."""
        n = len(tokens)
        if self.snapshot_every and (n == 1 or n % self.snapshot_every == 0):
            self._commit(tokens)
            self.prefix.snapshot()

    @contextmanager
    def generating(self, tokens: Sequence[int], between_tokens: tuple[type[BaseException], ...] = ()
                   ) -> Iterator[None]:
        """Around the generation loop, which appends to `tokens`. On success the cache records the reply (after EOS
        or the length cap the last token is not fed back; the next `sync` sees that). An exception of
        `between_tokens` was raised between two tokens, so the cache is consistent and keeps the reply so far;
        any other may have stopped a forward pass half-way: back to the last snapshot that is safe."""
        try:
            yield
        except between_tokens:
            self._commit(tokens)
            raise
        except BaseException:
            self.prefix.recover()
            raise
        self._commit(tokens)
        self.prefix.snapshot()

    def _commit(self, tokens: Sequence[int]) -> None:
        self.prefix.commit(self.ids + list(tokens))
