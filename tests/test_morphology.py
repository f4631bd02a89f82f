"""morphology: closings against literal scipy.ndimage compositions, streaming == whole volume."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from gpuheart import morphology as morph


def _reader(vol):
    return lambda z0, z1: vol[z0:z1]


def _random_mask(shape, p, seed):
    return np.random.default_rng(seed).random(shape) < p


def _stream(gen, shape):
    out = np.zeros(shape, bool)
    last = 0
    for z0, z1, m in gen:
        assert z0 == last and m.shape == (z1 - z0,) + tuple(shape[1:])
        out[z0:z1] = m
        last = z1
    assert last == shape[0]
    return out


def _scipy_closing_nearest(mask, structure, iterations, pad):
    """Independent reference: closing of the volume replicated far beyond the reach, cropped."""
    p = np.pad(mask, pad, mode="edge")
    d = ndi.binary_dilation(p, structure, iterations=iterations)
    e = ndi.binary_erosion(d, structure, iterations=iterations)
    return e[tuple(slice(a, s - b) for (a, b), s in zip(pad, e.shape))]


def test_close_z_matches_scipy_and_padding_is_enough():
    m = _random_mask((30, 9, 11), 0.15, 0)
    got = morph.close_z(m, 5, 5)
    # padding twice the reach must change nothing: the result is the closing of the infinite extension
    ref = _scipy_closing_nearest(m, np.ones((5, 1, 1), bool), 5, ((40, 40), (0, 0), (0, 0)))
    np.testing.assert_array_equal(got, ref)
    assert (got >= m).all()  # extensive, also at the faces
    # away from the z faces it is scipy's own binary_closing
    sc = ndi.binary_closing(m, np.ones((5, 1, 1), bool), iterations=5)
    np.testing.assert_array_equal(got[20:-20], sc[20:-20])


def test_close_z_bridges_gap_and_keeps_face_objects():
    m = np.zeros((40, 3, 3), bool)
    m[:5, 1, 1] = True           # touches the z = 0 face
    m[25:30, 1, 1] = True        # 19-slice gap to the first piece: bridged (<= 20)
    out = morph.close_z(m)
    assert out[:30, 1, 1].all() and not out[30:, 1, 1].any()
    assert out[0, 1, 1]  # scipy.binary_closing would erode this away
    assert not ndi.binary_closing(m, np.ones((5, 1, 1), bool), iterations=5)[0, 1, 1]


def test_close_3d_matches_scipy():
    m = _random_mask((12, 13, 14), 0.3, 1)
    got = morph.close_3d(m, 3)
    ref = _scipy_closing_nearest(m, np.ones((3, 3, 3), bool), 1, ((6, 6),) * 3)
    np.testing.assert_array_equal(got, ref)
    assert (got >= m).all()


def test_reach():
    assert morph.reach() == 22
    assert morph.reach(3, 2, 5) == 4 + 4
    with pytest.raises(ValueError):
        morph.reach(4)


@pytest.mark.parametrize("slab_size", [1, 3, 7, 22, 23, 64])
def test_postprocess_slabs_equals_whole(slab_size):
    shape = (50, 10, 12)
    m = _random_mask(shape, 0.08, slab_size)
    whole = morph.postprocess(m)
    got = _stream(morph.postprocess_slabs(_reader(m), shape, slab_size), shape)
    np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize("band_voxels", [1, 2 * 50 * 12, 3 * 50 * 12, 10 ** 9])   # bands of 1, 2, 3 rows, one band
@pytest.mark.parametrize("params", [(5, 5, 3), (3, 2, 5), (1, 0, 3), (5, 1, 1)])
def test_the_host_closes_bands_of_rows_with_the_whole_blocks_answer(monkeypatch, band_voxels, params):
    """Bands of rows bound SciPy's temporaries; each is read with the cube closing's reach in rows, so the
    result is the whole volume's closing (scipy on the edge-padded volume) voxel for voxel."""
    shape = (50, 11, 12)
    m = _random_mask(shape, 0.15, 7)
    monkeypatch.setattr(morph, "BAND_VOXELS", band_voxels)
    z_size, it, cube = params
    want = _scipy_closing_nearest(_scipy_closing_nearest(m, np.ones((z_size, 1, 1), bool), it,
                                                         ((2 * (z_size // 2) * it,) * 2, (0, 0), (0, 0))),
                                  np.ones((cube,) * 3, bool), 1, ((2 * (cube // 2),) * 2,) * 3)
    got = _stream(morph.postprocess_slabs(_reader(m), shape, 7, z_size, it, cube), shape)
    np.testing.assert_array_equal(got, want)


def test_postprocess_slabs_other_params():
    shape = (17, 8, 9)
    m = _random_mask(shape, 0.2, 5)
    whole = morph.postprocess(m, 3, 2, 5)
    got = _stream(morph.postprocess_slabs(_reader(m), shape, 2, 3, 2, 5), shape)
    np.testing.assert_array_equal(got, whole)


def _same_partition(a, b):
    """Two label images describe the same partition (bijection between nonzero labels)."""
    assert ((a > 0) == (b > 0)).all()
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("slab_size", [1, 4, 9, 100])
def test_label_slabs_equals_scipy_label(connectivity, slab_size):
    shape = (24, 15, 16)
    m = _random_mask(shape, 0.25, connectivity * 10 + slab_size)
    ref, n = ndi.label(m, ndi.generate_binary_structure(3, connectivity))
    res = morph.label_slabs(_reader(m), shape, slab_size, connectivity)
    assert res.n_components == n
    np.testing.assert_array_equal(res.sizes[1:], np.bincount(ref.ravel())[1:])
    lab = np.concatenate([l for _, _, l in res.relabel(_reader(m))])
    _same_partition(lab, ref)
    np.testing.assert_array_equal(lab, ref)  # even scipy's numbering
    part = list(res.relabel(_reader(m), (10, 13)))  # only the slabs overlapping slices 10..12
    assert part and all(z1 > 10 and z0 < 13 for z0, z1, _ in part)
    for z0, z1, l in part:
        np.testing.assert_array_equal(l, ref[z0:z1])
    boxes = ndi.find_objects(ref)
    np.testing.assert_array_equal(res.box_lo, [[s.start for s in b] for b in boxes])
    np.testing.assert_array_equal(res.box_hi, [[s.stop for s in b] for b in boxes])


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_label_slabs_in_threads_equals_one_thread(workers):
    shape = (23, 17, 19)
    m = _random_mask(shape, 0.3, workers)
    one = morph.label_slabs(_reader(m), shape, 4, 3)
    many = morph.label_slabs(_reader(m), shape, 4, 3, workers=workers)
    for field in ("sizes", "final", "box_lo", "box_hi"):
        np.testing.assert_array_equal(getattr(many, field), getattr(one, field))
    assert many.offsets == one.offsets
    ref = list(one.relabel(_reader(m), (5, 17)))
    got = list(one.relabel(_reader(m), (5, 17), workers=workers))
    assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in ref] and len(ref) == 4
    for (_, _, g), (_, _, r) in zip(got, ref):
        np.testing.assert_array_equal(g, r)


def test_label_slabs_in_threads_raises_the_first_failing_slab():
    m = _random_mask((20, 8, 8), 0.3, 1)
    read = _reader(m)

    def bad(z0, z1):
        if z0 >= 8:
            raise OSError(f"slab {z0} unreadable")
        return read(z0, z1)

    with pytest.raises(OSError, match="slab 8 unreadable"):
        morph.label_slabs(bad, m.shape, 4, 3, workers=3)


def test_face_pairs_are_the_unique_touching_label_pairs():
    rng = np.random.default_rng(0)
    below, above = rng.integers(0, 6, (2, 9, 11))
    for c in (1, 2, 3):
        got = morph._face_pairs(below, above, c)
        # independent: every neighbour offset the connectivity allows, pairs collected in a set
        want = set()
        for y in range(9):
            for x in range(11):
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if abs(dy) + abs(dx) + 1 <= c and 0 <= yy < 9 and 0 <= xx < 11 \
                                and below[y, x] and above[yy, xx]:
                            want.add((int(below[y, x]), int(above[yy, xx])))
        assert [tuple(p) for p in got.tolist()] == sorted(want)


def test_label_slabs_spiral_merges_late():
    # a U shape: two arms that only join in the last slab
    m = np.zeros((20, 5, 7), bool)
    m[:, 2, 1] = m[:, 2, 5] = True
    m[19, 2, 1:6] = True
    res = morph.label_slabs(_reader(m), m.shape, 3)
    assert res.n_components == 1 and res.sizes[1] == m.sum()
    assert res.box_lo.tolist() == [[0, 2, 1]] and res.box_hi.tolist() == [[20, 3, 6]]


def test_label_slabs_empty():
    m = np.zeros((5, 4, 4), bool)
    res = morph.label_slabs(_reader(m), m.shape, 2)
    assert res.n_components == 0 and res.box_lo.shape == res.box_hi.shape == (0, 3)
    out = _stream(morph.remove_small_slabs(_reader(m), m.shape, 2, 3), m.shape)
    assert not out.any()


@pytest.mark.parametrize("slab_size", [1, 5, 30])
def test_remove_small_slabs_equals_whole(slab_size):
    shape = (30, 14, 14)
    m = _random_mask(shape, 0.3, slab_size)
    ref = morph.remove_small(m, 10, 1)
    # independent reference: skimage
    import inspect

    from skimage.morphology import remove_small_objects
    # scikit-image 0.26 renamed min_size (drop < n) to max_size (drop <= n); the oldest we support has only min_size
    size = ({"max_size": 9} if "max_size" in inspect.signature(remove_small_objects).parameters
            else {"min_size": 10})
    np.testing.assert_array_equal(ref, remove_small_objects(m, connectivity=1, **size))
    got = _stream(morph.remove_small_slabs(_reader(m), shape, slab_size, 10), shape)
    np.testing.assert_array_equal(got, ref)


def test_a_slab_that_runs_out_of_device_memory_is_closed_on_the_host(monkeypatch):
    """Pass 3 on a GPU: an out-of-memory error closes that slab on the host (same voxels) with one warning."""
    from gpuheart import morphology as mo

    rng = np.random.default_rng(0)
    m = rng.random((20, 16, 16)) > 0.7
    want = np.concatenate([c for _, _, c in mo.postprocess_slabs(lambda a, b: m[a:b], m.shape, 6)])

    class FakeOOM(Exception):
        pass

    real, calls = mo.postprocess, []

    def flaky(block, *args, **kw):
        calls.append(1)
        if len(calls) % 2:   # every other call "runs out"
            raise FakeOOM("out of memory")
        return real(block, *args, **kw)

    monkeypatch.setattr(mo, "postprocess", flaky)
    monkeypatch.setattr(mo, "to_device", lambda x, device: x)
    monkeypatch.setattr(mo, "is_device_oom", lambda err: isinstance(err, FakeOOM))
    with pytest.warns(RuntimeWarning, match="out of device memory closing slices"):
        got = np.concatenate([c for _, _, c in mo.postprocess_slabs(lambda a, b: m[a:b], m.shape, 6, device="cuda")])
    np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(mo, "is_device_oom", lambda err: False)
    with pytest.raises(FakeOOM):   # anything else is not swallowed
        list(mo.postprocess_slabs(lambda a, b: m[a:b], m.shape, 6, device="cuda"))


def test_remove_small_of_an_empty_volume():
    for shape in [(0, 4, 4), (3, 0, 5)]:
        out = morph.remove_small(np.zeros(shape, bool), 2)
        assert out.shape == shape and out.dtype == bool


def test_negative_iterations_are_refused_by_name():
    # scipy reads iterations < 1 as "until nothing changes"; here it is a count, so a negative one is an
    # error that says so (it was np.pad's "index can't contain negative values", and reach() went negative)
    m = _random_mask((6, 4, 4), 0.3, 0)
    with pytest.raises(ValueError, match="iterations must be >= 0"):
        morph.close_z(m, 5, -1)
    with pytest.raises(ValueError, match="z_iterations must be >= 0"):
        morph.reach(5, -1)
    with pytest.raises(ValueError, match="z_iterations must be >= 0"):
        list(morph.postprocess_slabs(_reader(m), m.shape, 2, 5, -1))


def test_closings_name_a_mask_that_is_not_3d_or_not_binary():
    """A 2-D mask failed inside np.pad with a broadcast error; a probability map was closed as if every value
    above 0 were vessel. 0/1 and 0/255 float masks are still binary masks."""
    with pytest.raises(ValueError, match=r"\(z, y, x\) mask, got shape \(8, 8\)"):
        morph.postprocess(np.zeros((8, 8), bool))
    prob = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    for fn in (morph.postprocess, morph.close_z, morph.close_3d):
        with pytest.raises(ValueError, match="threshold it first"):
            fn(prob)
    m = prob > 0.7
    np.testing.assert_array_equal(morph.postprocess(m.astype(np.float32) * 255), morph.postprocess(m))


@pytest.mark.parametrize("params", [(5, 5, 3), (5, 5, 1), (3, 2, 5)])
def test_postprocess_slabs_halo_covers_the_longest_bridged_gap(params):
    """A gap just short enough to be bridged, cut by a slab boundary at every offset: the slab must see the
    voxel beyond the gap, exactly :func:`reach` slices away (random masks seldom hold such a gap)."""
    h = morph.reach(*params)
    nz = 3 * h
    for gap in range(h - 4, h + 1):
        m = np.zeros((nz, 5, 5), bool)
        m[2, 1:4, 1:4] = m[3 + gap, 1:4, 1:4] = True
        m[2, 2, 2] = m[3 + gap, 2, 2] = True
        whole = morph.postprocess(m, *params)
        for z0 in range(3, 4 + gap):  # a slab starts inside the gap: its halo must reach slice 2
            got = _stream(morph.postprocess_slabs(_reader(m), m.shape, z0, *params), m.shape)
            np.testing.assert_array_equal(got, whole, err_msg=f"gap {gap}, cut at {z0}")


@pytest.mark.parametrize("size", [(1, 1, 1), (3, 1, 1), (5, 3, 3), (21, 1, 1), (31, 3, 5), (3, 3, 3), (7, 1, 1)])
@pytest.mark.parametrize("nz", [1, 2, 6, 40])
def test_box_max_and_min_equal_scipy_filters_with_zeros_outside(size, nz):
    """The closings' fast path (whole planes at a time along z) against scipy.ndimage's own box filters,
    windows longer than the stack included."""
    u8 = (np.random.default_rng(nz).random((nz, 9, 11)) > 0.7).astype(np.uint8)
    for op, ref in ((np.maximum, ndi.maximum_filter), (np.minimum, ndi.minimum_filter)):
        np.testing.assert_array_equal(morph._box(u8, size, op), ref(u8, size=size, mode="constant", cval=0))
