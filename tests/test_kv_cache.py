import pytest
import torch

from pd.kv_cache import DUMMY_PAGE, KVLayout, KVOrder, KVPool, PageAllocator, merge_page_runs, transfer_pieces


def test_allocator_hands_out_each_page_once_and_never_the_dummy():
    alloc = PageAllocator(9)
    pages = alloc.alloc(8)
    assert sorted(pages) == list(range(1, 9))
    assert DUMMY_PAGE not in pages
    assert alloc.alloc(1) is None
    assert alloc.num_free == 0 and alloc.num_used == 8


def test_allocator_all_or_nothing_and_refcounts():
    alloc = PageAllocator(5)
    a = alloc.alloc(3)
    assert alloc.alloc(2) is None  # only one free: nothing taken
    assert alloc.num_free == 1
    alloc.incref(a[:1])
    alloc.free(a)
    assert alloc.num_free == 3  # a[0] still held by its second reference
    assert alloc.refcount(a[0]) == 1
    alloc.free(a[:1])
    assert alloc.num_free == 4


def test_allocator_rejects_double_free_and_foreign_pages():
    alloc = PageAllocator(4)
    p = alloc.alloc(2)
    alloc.free(p)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(p[:1])
    with pytest.raises(ValueError, match="out of range"):
        alloc.free([DUMMY_PAGE])
    with pytest.raises(ValueError, match="out of range"):
        alloc.free([4])
    # A failed free changes nothing.
    q = alloc.alloc(1)
    with pytest.raises(ValueError):
        alloc.free([q[0], q[0]])
    assert alloc.refcount(q[0]) == 1


def test_allocator_holds_pages_freed_for_a_step_until_it_is_released():
    """A page freed with ``hold`` (the tag of a step in flight) whose last reference goes waits for ``release`` of
    that tag; other pages free at once; releasing one tag does not release pages held for a later one."""
    a = PageAllocator(10)
    pages = a.alloc(6)
    assert pages is not None
    a.free(pages[:2], hold=1)
    a.free(pages[4:5])
    assert a.num_free == 3 + 1  # the unheld page only
    with pytest.raises(ValueError, match="double free"):
        a.free(pages[:1])  # held is free as far as references go
    a.free(pages[2:3], hold=2)
    a.release(0)
    assert a.num_free == 4
    a.release(1)
    assert a.num_free == 6  # tag 1's two; pages[2] waits for tag 2
    a.release(2)
    a.free(pages[3:4] + pages[5:6])
    assert a.num_free == 9 and a.num_used == 0
    assert sorted(a.alloc(9) or []) == list(range(1, 10))


def test_merge_page_runs():
    assert merge_page_runs([1, 2, 3, 7, 8], [4, 5, 6, 9, 11]) == [(1, 4, 3), (7, 9, 1), (8, 11, 1)]
    assert merge_page_runs([], []) == []
    with pytest.raises(ValueError):
        merge_page_runs([1], [])


@pytest.mark.parametrize("order", list(KVOrder))
def test_transfer_pieces_copy_exactly_the_pages(order):
    src_l = KVLayout(3, 10, 4, 6, torch.float32, order)
    dst_l = KVLayout(3, 12, 4, 6, torch.float32, order)
    src, dst = KVPool(src_l, "cpu"), KVPool(dst_l, "cpu")
    src.buffer.copy_(torch.randn(src_l.shape))
    src_pages, dst_pages = [2, 3, 4, 9], [5, 6, 1, 2]
    s_bytes = src.buffer.view(-1).view(torch.uint8)
    d_bytes = dst.buffer.view(-1).view(torch.uint8)
    pieces = transfer_pieces(src_l, dst_l, src_pages, dst_pages)
    for s_off, d_off, n in pieces:
        d_bytes[d_off : d_off + n] = s_bytes[s_off : s_off + n]
    for layer in range(3):
        for sp, dp in zip(src_pages, dst_pages):
            assert torch.equal(src.layer(layer)[sp], dst.layer(layer)[dp])
    untouched = [p for p in range(12) if p not in dst_pages]
    assert all(dst.layer(layer)[p].abs().sum() == 0 for layer in range(3) for p in untouched)
    # Merged runs: (2,5,2) (4,1,1) (9,2,1) -> 3 runs; page-major moves each as one piece.
    assert len(pieces) == (3 if order is KVOrder.PAGE_MAJOR else 9)


@pytest.mark.parametrize("order", list(KVOrder))
def test_transfer_pieces_of_layer_runs_copy_exactly_those_layers(order):
    """A layer-by-layer send moves runs of layers: each run's pieces copy those layers of the pages, no other."""
    src_l, dst_l = KVLayout(3, 10, 4, 6, torch.float32, order), KVLayout(3, 12, 4, 6, torch.float32, order)
    src, dst = KVPool(src_l, "cpu"), KVPool(dst_l, "cpu")
    src.buffer.copy_(torch.randn(src_l.shape))
    src_pages, dst_pages = [2, 3, 4, 9], [5, 6, 1, 2]
    s_bytes, d_bytes = src.buffer.view(-1).view(torch.uint8), dst.buffer.view(-1).view(torch.uint8)
    for span in (range(1, 3), range(0, 1)):
        for s_off, d_off, n in transfer_pieces(src_l, dst_l, src_pages, dst_pages, span):
            d_bytes[d_off : d_off + n] = s_bytes[s_off : s_off + n]
        for layer in range(3):
            copied = layer >= span.start
            for sp, dp in zip(src_pages, dst_pages):
                assert torch.equal(src.layer(layer)[sp], dst.layer(layer)[dp]) == copied, (span, layer)
    untouched = [p for p in range(12) if p not in dst_pages]
    assert all(dst.layer(layer)[p].abs().sum() == 0 for layer in range(3) for p in untouched)
    for bad in (range(0, 4), range(2, 2), range(0, 3, 2)):
        with pytest.raises(ValueError, match="not a run of the pool's 3 layers"):
            transfer_pieces(src_l, dst_l, src_pages, dst_pages, bad)


def test_transfer_pieces_refuse_mismatched_layouts():
    a = KVLayout(3, 10, 4, 6, torch.float32)
    with pytest.raises(ValueError, match="page_size"):
        transfer_pieces(a, KVLayout(3, 10, 8, 6, torch.float32), [1], [1])
    with pytest.raises(ValueError, match="out of range"):
        transfer_pieces(a, a, [0], [1])


def test_layout_offsets_match_tensor_layout():
    for order in KVOrder:
        layout = KVLayout(2, 5, 3, 4, torch.bfloat16, order)
        pool = KVPool(layout, "cpu")
        for layer in range(2):
            for page in range(5):
                view = pool.layer(layer)[page]
                assert view.data_ptr() - pool.data_ptr == layout.offset(layer, page)
        assert pool.nbytes == pool.buffer.numel() * 2


def test_freed_pages_come_back_as_ascending_runs():
    """After requests come and go, a new request's pages are still one ascending run where the free pages
    allow it, so its KV moves as one transfer piece per layer (before, every page after the first free came
    out in descending order and moved alone: 1728 pieces for a 1024-token prompt of 27 layers)."""
    a = PageAllocator(1000)
    first = a.alloc(64)
    assert first == list(range(1, 65))
    a.free(first)
    assert a.alloc(64) == first
    a.free(first)
    x, y = a.alloc(10), a.alloc(30)
    a.free(x)
    a.free(y)
    z = a.alloc(30)
    assert len(merge_page_runs(z, z)) == 1 and z == sorted(z)
    layout = KVLayout(27, 1000, 16, 576, torch.bfloat16)
    assert len(transfer_pieces(layout, layout, z, z)) == 27
