"""MNIST-1D is generated once per machine and kept as a plain ``.npz``: a cached load equals a
fresh generation, leaves the global random generators alone, never unpickles, and a damaged or
unwritable cache only means generating again."""

import random

import numpy as np
import pytest

from selfmod.data import datasets

ARGS = (7, 200, 0.25, 48)  # a small dataset: seed, samples, noise, translation


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFMOD_CACHE", str(tmp_path / "cache"))
    datasets._mnist1d_arrays.cache_clear()
    yield tmp_path / "cache"
    datasets._mnist1d_arrays.cache_clear()


def _global_draws() -> tuple[float, float]:
    return random.random(), float(np.random.rand())


def _load():
    datasets._mnist1d_arrays.cache_clear()  # the process cache would hide the file
    return datasets._mnist1d_arrays(*ARGS)


def test_a_cached_load_equals_a_fresh_generation_and_touches_no_global_generator(cache):
    random.seed(3)
    np.random.seed(3)
    expected_draws = _global_draws()
    random.seed(3)
    np.random.seed(3)
    fresh = _load()  # generates (make_dataset seeds the global generators) and writes the file
    assert _global_draws() == expected_draws
    (written,) = cache.iterdir()
    assert written.suffix == ".npz" and not list(cache.glob(".*.tmp"))
    random.seed(3)
    np.random.seed(3)
    cached = _load()
    assert _global_draws() == expected_draws
    assert len(fresh) == len(cached) == 4
    for a, b in zip(fresh, cached, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert len(fresh[0]) == 160 and len(fresh[2]) == 40  # 80/20 of 200


@pytest.mark.parametrize(
    "damage", [b"", b"not a zip file", b"PK\x03\x04 torn"], ids=["empty", "garbage", "torn"]
)
def test_a_damaged_cache_file_is_generated_again(cache, damage):
    fresh = _load()
    (path,) = cache.iterdir()
    path.write_bytes(damage)
    again = _load()
    assert all(np.array_equal(a, b) for a, b in zip(fresh, again, strict=True))
    assert path.stat().st_size > 1000  # rewritten whole


def test_a_cache_file_that_needs_pickle_is_generated_again(cache):
    fresh = _load()
    (path,) = cache.iterdir()
    # an object array would need pickle to load; it is refused, never unpickled
    evil = np.array([object()], dtype=object)
    with open(path, "wb") as f:
        np.savez(f, x=evil, y=fresh[1], x_test=fresh[2], y_test=fresh[3])
    again = _load()
    assert all(np.array_equal(a, b) for a, b in zip(fresh, again, strict=True))


def test_an_unwritable_cache_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("SELFMOD_CACHE", str(blocker / "cache"))
    first = _load()
    second = _load()
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def _poison(path, arrays, sha256=None):
    x, y, xt, yt = arrays
    values = {"x": x + 1.0, "y": y, "x_test": xt, "y_test": yt}
    if sha256 is not None:
        values["sha256"] = np.array(sha256)
    np.savez(path, **values)


@pytest.mark.parametrize("sha256", [None, "0" * 64, "stale"], ids=["none", "wrong", "stale"])
def test_a_poisoned_cache_file_is_detected_and_generated_again(cache, sha256):
    fresh = _load()
    (path,) = cache.iterdir()
    with np.load(path, allow_pickle=False) as f:
        stale = str(f["sha256"])
    _poison(path, fresh, stale if sha256 == "stale" else sha256)
    again = _load()
    assert all(np.array_equal(a, b) for a, b in zip(fresh, again, strict=True))
    with np.load(path, allow_pickle=False) as f:  # and rewritten
        assert np.array_equal(f["x"], fresh[0]) and str(f["sha256"]) == stale


def test_a_cache_file_others_may_write_or_a_link_is_not_used(cache, tmp_path):
    fresh = _load()
    (path,) = cache.iterdir()
    elsewhere = tmp_path / "elsewhere.npz"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    assert all(np.array_equal(a, b) for a, b in zip(fresh, _load(), strict=True))
    assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o666)
    _load()
    assert path.stat().st_mode & 0o777 == 0o600  # generated again and rewritten 0600
