"""The host-side page arithmetic of attention steps (no GPU needed): FlashInfer's step metadata
(``_StepMeta``: every new token's cache slot, the pages each sequence reads) against a per-token
reference, and ``pad_for_graph`` (a graph bucket's rows: real ones kept, tables run on with the dummy
page, padding rows on the dummy page holding the bucket's other tokens)."""

from __future__ import annotations

import random

import pytest

from pd.attention.base import AttnInputs, pad_for_graph
from pd.attention.flashinfer_mla import _StepMeta
from pd.kv_cache import DUMMY_PAGE
from pd.types import BatchMode


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_step_meta_slots_and_pages_equal_a_per_token_reference(page_size):
    rng = random.Random(page_size)
    for _ in range(100):
        b = rng.randint(1, 9)
        starts = [rng.randint(0, 40) for _ in range(b)]
        ends = [s + rng.randint(1, 9) for s in starts]
        tables = [rng.sample(range(1, 500), -(-e // page_size) + rng.randint(0, 2)) for e in ends]
        meta = _StepMeta.of(AttnInputs(BatchMode.DECODE, starts, ends, tables), page_size)
        slots = [
            t[p // page_size] * page_size + p % page_size
            for t, s, e in zip(tables, starts, ends)
            for p in range(s, e)
        ]
        assert meta.out_slots.tolist() == slots
        assert meta.flat_pages.tolist() == [x for t, e in zip(tables, ends) for x in t[: -(-e // page_size)]]


def test_pad_for_graph_keeps_real_rows_and_pads_onto_the_dummy_page():
    # Two verify rows of 3 positions (the second's table ends before its last position), in a bucket of
    # 4 rows and 12 tokens: the two padding rows take 1 and 5 positions.
    inputs = AttnInputs(BatchMode.DECODE, [5, 7], [8, 10], [[11, 12], [13, 14]])
    padded = pad_for_graph(inputs, batch=4, tokens=12, page_size=4)
    assert padded.starts == [5, 7, 0, 0] and padded.ends == [8, 10, 1, 5]
    assert padded.page_tables == [[11, 12], [13, 14, DUMMY_PAGE], [DUMMY_PAGE], [DUMMY_PAGE] * 2]
    assert sum(padded.q_lens) == 12
    with pytest.raises(AssertionError):  # no padding row left for the spare tokens
        pad_for_graph(inputs, batch=2, tokens=7, page_size=4)


def test_extend_buckets_hold_their_padding_rows():
    """Each extend graph bucket keeps a row for padding and a token for each padding row: none below 32."""
    from pd.engine.extend_graph import ROWS, default_extend_buckets

    assert default_extend_buckets(0) == default_extend_buckets(16) == []
    assert default_extend_buckets(256) == [32, 64, 128, 256] and default_extend_buckets(100) == [32, 64, 100]
    assert all(t > ROWS for t in default_extend_buckets(4096))
