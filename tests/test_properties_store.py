"""The store as a state machine (hypothesis's stateful testing): random sequences of append,
read, attend, crop, clear, checkpoint, commit, rollback and host-budget changes, on stores with
full and sliding-window layers and tight host limits, checked after every step against a plain
Python model of what the store should hold.

The model keeps every token ever appended (and not cropped) per layer. The store may drop
positions a sliding window no longer reaches, block by block; what it keeps must include what
the window needs, and every position it keeps reads back exactly. A rollback returns exactly to
the checkpoint; a refused call (a window already dropped what a crop needs, an append over the
host limit) changes nothing.
"""

from __future__ import annotations

import pytest
import torch
from _props import examples
from _reference import reference
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from headinfer import OutOfHostMemoryError, _core

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Panicked(AssertionError):
    """A Rust panic reached Python (PyO3's PanicException, a BaseException): as an
    AssertionError, so that hypothesis shrinks the sequence that caused it."""


class Guarded:
    """The real store; a panic out of any of its methods is raised as ``Panicked``."""

    def __init__(self, store: _core.KVStore) -> None:
        self.__dict__["_store"] = store

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args: object, **kwargs: object) -> object:
            try:
                return attr(*args, **kwargs)
            except Exception:
                raise
            except BaseException as exc:
                if type(exc).__name__ != "PanicException":
                    raise
                raise Panicked(f"{name}{args}: Rust panicked: {exc}") from exc

        return call

    def __setattr__(self, name: str, value: object) -> None:
        setattr(self._store, name, value)


class StoreMachine(RuleBasedStateMachine):
    """A ``KVStore`` beside its model (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.store: _core.KVStore | None = None
        self.tokens: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: [H, len, D]
        self.step: dict | None = None  # the model's checkpoint
        self.floor: list[int] = []  # per layer: lowest position the window may still need
        self.seed = 0

    @initialize(
        layers=st.integers(1, 3),
        heads=st.integers(1, 3),
        head_dim=st.sampled_from([1, 4, 16]),
        dtype=st.sampled_from(sorted(DTYPES)),
        block=st.sampled_from([1, 2, 3, 8]),
        # Windows of 1-3 tokens (down to a single block) are where the edges are.
        windows=st.lists(
            st.one_of(st.none(), st.integers(1, 3), st.integers(1, 12)), min_size=3, max_size=3
        ),
        limit_blocks=st.one_of(st.none(), st.integers(0, 40)),
    )
    def make(
        self,
        layers: int,
        heads: int,
        head_dim: int,
        dtype: str,
        block: int,
        windows: list[int | None],
        limit_blocks: int | None,
    ) -> None:
        self.windows = windows[:layers]
        self.block = block
        self.heads, self.d, self.dtype = heads, head_dim, DTYPES[dtype]
        self.block_bytes = 2 * heads * block * head_dim * self.dtype.itemsize
        limit = None if limit_blocks is None else limit_blocks * self.block_bytes
        self.limit = limit
        self.store = Guarded(  # type: ignore[assignment]
            _core.KVStore(
                layers, heads, head_dim, dtype, block, windows=self.windows, host_memory_limit=limit
            )
        )
        empty = torch.empty(heads, 0, head_dim, dtype=self.dtype)
        self.tokens = [(empty, empty) for _ in range(layers)]
        self.floor = [0] * layers

    # -- helpers ----------------------------------------------------------------------------

    def rand(self, *shape: int) -> torch.Tensor:
        self.seed += 1
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(shape, generator=g).to(self.dtype)

    def lengths(self) -> list[int]:
        return [k.shape[1] for k, _ in self.tokens]

    def snapshot(self) -> dict:
        assert self.store is not None
        return {
            "tokens": list(self.tokens),
            "floor": list(self.floor),
            "start": [self.store.retained_start(i) for i in range(len(self.tokens))],
        }

    def end_step_if(self, ends: bool) -> None:
        if ends:
            self.step = None

    # -- rules ------------------------------------------------------------------------------

    @rule(layer=st.integers(0, 2), n=st.integers(0, 9))
    def append(self, layer: int, n: int) -> None:
        assert self.store is not None
        layer %= len(self.tokens)
        k, v = self.rand(self.heads, n, self.d), self.rand(self.heads, n, self.d)
        before = self.store.bytes_reserved()
        try:
            self.store.append(layer, k, v)
        except OutOfHostMemoryError as exc:
            # Refused for the limit: nothing taken, nothing changed (checked by the invariants).
            assert self.limit is not None, exc
            assert exc.needed > exc.available, (exc.needed, exc.available)
            assert self.store.bytes_reserved() == before
            return
        old_k, old_v = self.tokens[layer]
        # The chunk's first query sits at the old length: it needs keys from there less the
        # window; the store may drop anything below.
        w = self.windows[layer]
        if w is not None:
            self.floor[layer] = max(self.floor[layer], old_k.shape[1] + 1 - w)
        self.tokens[layer] = (torch.cat([old_k, k], 1), torch.cat([old_v, v], 1))

    @rule(layer=st.integers(0, 2), data=st.data())
    def read(self, layer: int, data: st.DataObject) -> None:
        assert self.store is not None
        layer %= len(self.tokens)
        k, v = self.tokens[layer]
        n = k.shape[1]
        start = self.store.retained_start(layer)
        a = data.draw(st.integers(0, n), label="start")
        b = data.draw(st.integers(a, n), label="end")
        ko = torch.full((self.heads, b - a, self.d), float("nan"), dtype=self.dtype)
        vo = ko.clone()
        if a < start and a == b:
            return  # an empty read below the retained start: either answer is right
        if a < start:
            with pytest.raises(ValueError, match=r"^start: "):
                self.store.read(layer, a, b, ko, vo)
            return
        self.store.read(layer, a, b, ko, vo)
        assert torch.equal(ko, k[:, a:b]) and torch.equal(vo, v[:, a:b]), (layer, a, b)

    @rule(layer=st.integers(0, 2), lq=st.integers(1, 4), group=st.integers(1, 2))
    def attend(self, layer: int, lq: int, group: int) -> None:
        """The last ``lq`` tokens' queries over the layer, with its window: as the model holds."""
        assert self.store is not None
        layer %= len(self.tokens)
        k, v = self.tokens[layer]
        if k.shape[1] < lq:
            return
        w = self.windows[layer]
        if w is not None and self.store.retained_start(layer) > max(k.shape[1] - lq + 1 - w, 0):
            return  # the chunk is older than the window kept: not a query the model makes
        q = self.rand(self.heads * group, lq, self.d)
        out = torch.empty_like(q)
        self.store.attend(layer, q, out, 0.5, window=w)
        ref = reference(q, k, v, 0.5, window=w)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[self.dtype]
        err = float((out.double() - ref).abs().max())
        assert err <= tol * max(float(ref.abs().max()), 1e-3), err

    @rule(length=st.integers(0, 40))
    def crop(self, length: int) -> None:
        assert self.store is not None
        # Refused when a window layer longer than `length` already dropped positions that
        # position `length` (the next token) needs; `crop(0)` always works.
        refuse = length > 0 and any(
            w is not None and n > length and self.store.retained_start(i) > max(length + 1 - w, 0)
            for i, (w, n) in enumerate(zip(self.windows, self.lengths()))
        )
        if refuse:
            before = self.snapshot()
            with pytest.raises(ValueError, match=r"^length: "):
                self.store.crop(length)
            assert self.snapshot()["start"] == before["start"]
            return
        if self.step is not None:
            # A crop below a layer's checkpoint length (of a layer it shortens) ends the step.
            ckpt = [k.shape[1] for k, _ in self.step["tokens"]]
            self.end_step_if(
                any(length < n and length < c for n, c in zip(self.lengths(), ckpt))
                or (length == 0 and any(c > 0 for c in ckpt))
            )
        self.store.crop(length)
        self.tokens = [(k[:, :length], v[:, :length]) for k, v in self.tokens]
        for i, w in enumerate(self.windows):
            if w is not None:
                self.floor[i] = min(self.floor[i], max(length + 1 - w, 0))

    @rule(layer=st.integers(0, 2), which=st.sampled_from(["start", "start+1", "len-1"]))
    def crop_at_an_edge(self, layer: int, which: str) -> None:
        """A crop to a layer's own edges: its retained start (the shortest crop a window
        allows), one past it, one short of its length."""
        assert self.store is not None
        layer %= len(self.tokens)
        start, n = self.store.retained_start(layer), self.lengths()[layer]
        self.crop({"start": start, "start+1": start + 1, "len-1": max(n - 1, 0)}[which])

    @rule()
    def clear(self) -> None:
        assert self.store is not None
        self.store.clear()
        self.tokens = [(k[:, :0], v[:, :0]) for k, v in self.tokens]
        self.floor = [0] * len(self.tokens)
        self.step = None

    @rule()
    def checkpoint(self) -> None:
        assert self.store is not None
        self.store.checkpoint()
        self.step = self.snapshot()

    @rule()
    def commit(self) -> None:
        assert self.store is not None
        self.store.commit()
        self.step = None

    @rule()
    def rollback(self) -> None:
        assert self.store is not None
        if self.step is None:
            with pytest.raises(ValueError):
                self.store.rollback()
            return
        self.store.rollback()
        self.tokens = list(self.step["tokens"])
        self.floor = list(self.step["floor"])
        starts = [self.store.retained_start(i) for i in range(len(self.tokens))]
        assert starts == self.step["start"], "rollback did not restore the retained starts"
        self.step = None

    @precondition(lambda self: self.store is not None)
    @rule(budget=st.integers(0, 1 << 20))
    def device_budget(self, budget: int) -> None:
        # A CPU store has no device budget: setting one is refused by name, changing nothing
        # (its host budget, host_memory_limit, is fixed when it is made).
        assert self.store is not None
        with pytest.raises(ValueError, match=r"^device_budget: "):
            self.store.device_budget = budget
        assert self.store.device_budget == 0

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        store = self.store
        if store is None:
            return
        assert store.in_step == (self.step is not None), (store.in_step, self.step is not None)
        used = 0
        for i, (k, _) in enumerate(self.tokens):
            n = k.shape[1]
            assert store.seq_len(i) == n, (i, store.seq_len(i), n)
            start = store.retained_start(i)
            w = self.windows[i]
            if w is None:
                assert start == 0, (i, start)
            else:
                assert start <= max(self.floor[i], 0), (i, start, self.floor[i])
                assert start % self.block == 0 or start == n, (i, start)
            assert 0 <= start <= n, (i, start, n)
            used += (n - start) * self.heads * self.d * 2 * self.dtype.itemsize
        assert store.bytes_used() == used, (store.bytes_used(), used)
        assert store.bytes_used() <= store.bytes_reserved()
        if self.limit is not None:
            assert store.host_bytes_reserved() <= self.limit


StoreMachine.TestCase.settings = settings(
    max_examples=examples(1500), stateful_step_count=40, deadline=None
)
TestStoreMachine = StoreMachine.TestCase
