"""Tests for torch_rankone.data: the LIBSVM parser, dataset lookup and the shared data files."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_rankone import data
from torch_rankone.data import CANONICAL_FEATURES, SHA256, find_libsvm, libsvm, load_libsvm


def _find_shared() -> Path | None:
    for ancestor in Path(__file__).resolve().parents:
        candidate = ancestor / "shared" / "data" / "libsvm"
        if (candidate / "PROVENANCE.md").is_file():
            return candidate
    return None


# torch warns once per process that sparse CSR support is in beta.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

SHARED = _find_shared()
needs_shared = pytest.mark.skipif(
    SHARED is None, reason="shared/data/libsvm (with PROVENANCE.md) not found above the tests"
)

# The files listed in PROVENANCE.md's Summary table. Hard-coded so that the parametrization
# does not depend on parsing the markdown, and checked against the table below.
SHARED_FILES = [
    "a1a.gz", "a1a.t.gz", "a2a.gz", "a2a.t.gz", "a7a.gz", "a9a.gz", "a9a.t.gz",
    "w1a.gz", "w1a.t.gz", "w8a.gz", "w8a.t.gz", "mushrooms.gz", "phishing.gz", "madelon.t.gz",
]  # fmt: skip
# Independent of the markdown parser: official LIBSVM row counts.
KNOWN_ROWS = {"a9a.gz": 32561, "w8a.gz": 49749, "mushrooms.gz": 8124}


def _provenance_summary() -> dict[str, dict]:
    """Rows of the Summary table in PROVENANCE.md, keyed by file name."""
    text = (SHARED / "PROVENANCE.md").read_text(encoding="utf-8")
    section = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[0].endswith(".gz"):
            continue
        file, rows, max_index, labels, nnz, sha256 = cells
        table[file] = {
            "rows": int(rows),
            "max_index": int(max_index.split()[0]),  # "119 (nominal 123)"
            "labels": {
                float(value): int(count)
                for value, count in (pair.split(":") for pair in labels.split(","))
            },
            "nnz": int(nnz),
            "sha256": sha256,
        }
    return table


@pytest.fixture(scope="module")
def summary() -> dict[str, dict]:
    if SHARED is None:
        pytest.skip("shared/data/libsvm not found")
    return _provenance_summary()


@pytest.fixture(scope="module")
def load_shared():
    """Loads a shared file (sparse, canonical n_features) at most once per module."""
    if SHARED is None:
        pytest.skip("shared/data/libsvm not found")
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def load(file: str) -> tuple[torch.Tensor, torch.Tensor]:
        if file not in cache:
            n_features = CANONICAL_FEATURES[file.split(".")[0]]
            cache[file] = load_libsvm(SHARED / file, n_features, sparse=True)
        return cache[file]

    return load


def _write(path: Path, text: str, *, compress: bool = False) -> Path:
    raw = text.encode()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


# --- the shared data files -------------------------------------------------------------------


@needs_shared
def test_summary_table_lists_the_shared_files(summary):
    assert sorted(summary) == sorted(SHARED_FILES)
    assert sorted(p.name for p in SHARED.glob("*.gz")) == sorted(SHARED_FILES)
    for file, rows in KNOWN_ROWS.items():
        assert summary[file]["rows"] == rows
    assert {file.removesuffix(".gz") for file in SHARED_FILES} == set(SHA256)


@needs_shared
@pytest.mark.parametrize("file", SHARED_FILES)
def test_shared_file_matches_provenance(file, summary, load_shared):
    expected = summary[file]
    X, y = load_shared(file)
    assert X.layout == torch.sparse_csr
    assert X.shape == (expected["rows"], CANONICAL_FEATURES[file.split(".")[0]])
    if file in KNOWN_ROWS:
        assert X.shape[0] == KNOWN_ROWS[file]
    assert X.values().numel() == expected["nnz"]  # stored entries, zeros included
    assert int(X.col_indices().max()) + 1 == expected["max_index"]
    low, high = sorted(expected["labels"])
    assert int((y == -1).sum()) == expected["labels"][low]
    assert int((y == 1).sum()) == expected["labels"][high]
    assert y.dtype == X.dtype == torch.float64


@needs_shared
@pytest.mark.parametrize("file", SHARED_FILES)
def test_sha256_table_matches_shared_files(file):
    text = gzip.decompress((SHARED / file).read_bytes())
    assert hashlib.sha256(text).hexdigest() == SHA256[file.removesuffix(".gz")]


@needs_shared
def test_data_dirs_finds_shared_folder(monkeypatch):
    monkeypatch.delenv("TORCH_RANKONE_DATA", raising=False)
    assert SHARED.resolve() in [d.resolve() for d in data.data_dirs()]
    assert find_libsvm("a9a", split="test") is not None


@needs_shared
def test_libsvm_by_name(monkeypatch):
    monkeypatch.delenv("TORCH_RANKONE_DATA", raising=False)
    X, y = libsvm("a9a")
    assert X.shape == (32561, 123) and y.shape == (32561,)
    X, y = libsvm("a9a", split="test")
    assert X.shape == (16281, 123) and y.shape == (16281,)


@needs_shared
def test_mushrooms_labels_and_sparse_matches_dense(monkeypatch):
    monkeypatch.delenv("TORCH_RANKONE_DATA", raising=False)
    X, y = libsvm("mushrooms")
    assert X.shape == (8124, 112) and X.layout == torch.strided
    assert set(y.tolist()) == {-1.0, 1.0}
    assert int((y == -1).sum()) == 3916 and int((y == 1).sum()) == 4208
    Xs, ys = libsvm("mushrooms", sparse=True)
    assert Xs.layout == torch.sparse_csr
    assert torch.equal(Xs.to_dense(), X) and torch.equal(ys, y)
    X32, y32 = libsvm("mushrooms", dtype=torch.float32)
    assert X32.dtype == y32.dtype == torch.float32
    assert torch.equal(X32, X.float())


# --- lookup and download ---------------------------------------------------------------------


def test_environment_variable_is_searched_first(tmp_path, monkeypatch):
    _write(tmp_path / "a9a", "+1 1:1 123:2\n-1 5:1\n")
    monkeypatch.setenv("TORCH_RANKONE_DATA", str(tmp_path))
    assert data.data_dirs()[0] == tmp_path
    assert find_libsvm("a9a") == tmp_path / "a9a"
    X, y = libsvm("a9a")
    assert X.shape == (2, 123)
    assert X[0, 122] == 2 and y.tolist() == [1.0, -1.0]


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match=r"unknown LIBSVM dataset 'nope'.*a9a.*mushrooms"):
        libsvm("nope")
    with pytest.raises(ValueError, match="split"):
        libsvm("a9a", split="validation")


@pytest.fixture
def empty_search(tmp_path, monkeypatch) -> Path:
    """Search only an empty directory and use an empty cache; returns the cache directory."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(data, "data_dirs", lambda: [empty])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "torch_rankone" / "libsvm"


def test_missing_dataset_without_network(empty_search, monkeypatch, tmp_path):
    requested = []

    def offline(url, timeout):
        requested.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(data, "_download", offline)
    assert find_libsvm("a9a") is None
    with pytest.raises(FileNotFoundError) as info:
        libsvm("a9a", split="test")
    url = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/a9a.t"
    assert requested == [url]
    message = str(info.value)
    for part in (str(tmp_path / "empty"), url, "network is unreachable", "TORCH_RANKONE_DATA"):
        assert part in message
    assert not empty_search.exists()


def test_dataset_without_checksum_is_not_downloaded(empty_search, monkeypatch):
    def unexpected(url, timeout):
        raise AssertionError("no download without a known SHA-256")

    monkeypatch.setattr(data, "_download", unexpected)
    with pytest.raises(FileNotFoundError, match="not downloaded automatically"):
        libsvm("madelon")


def test_download_is_verified_and_cached(empty_search, monkeypatch):
    text = b"+1 1:1 3:0.5 \n-1 2:1 \n"
    monkeypatch.setitem(SHA256, "a1a", hashlib.sha256(text).hexdigest())
    monkeypatch.setattr(data, "_download", lambda url, timeout: text)
    X, y = libsvm("a1a")
    assert X.shape == (2, 123) and y.tolist() == [1.0, -1.0]
    cached = empty_search / "a1a.gz"
    assert gzip.decompress(cached.read_bytes()) == text
    assert [p.name for p in empty_search.iterdir()] == ["a1a.gz"]

    def offline(url, timeout):
        raise OSError("offline")

    monkeypatch.setattr(data, "data_dirs", lambda: [empty_search])
    monkeypatch.setattr(data, "_download", offline)
    X2, _ = libsvm("a1a")  # served from the cache now
    assert torch.equal(X, X2)


def test_download_with_wrong_checksum_is_rejected(empty_search, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda url, timeout: b"+1 1:1\n-1 2:1\n")
    with pytest.raises(FileNotFoundError, match="SHA-256"):
        libsvm("w1a")
    assert not (empty_search / "w1a.gz").exists()


# --- the parser ------------------------------------------------------------------------------


def test_tolerated_syntax(tmp_path):
    text = (
        "# SVMlight header comment\r\n"
        "+1 qid:3 1:0.5 3:2   # trailing comment\r\n"
        "-1 qid:3 2:-1e-1 \r\n"
        "\r\n"
        "1 3:4\t\r\n"
        "\n\n"
    )
    X, y = load_libsvm(_write(tmp_path / "ok.svm", text))
    expected = [[0.5, 0.0, 2.0], [0.0, -0.1, 0.0], [0.0, 0.0, 4.0]]
    assert torch.equal(X, torch.tensor(expected, dtype=torch.float64))
    assert y.tolist() == [1.0, -1.0, 1.0]


def test_gzip_detected_by_content_not_name(tmp_path):
    text = "1 1:1\n2 2:3\n"
    X1, y1 = load_libsvm(_write(tmp_path / "looks_plain.txt", text, compress=True))
    X2, y2 = load_libsvm(_write(tmp_path / "looks_compressed.gz", text))
    assert torch.equal(X1, X2) and torch.equal(y1, y2)
    assert X1.tolist() == [[1.0, 0.0], [0.0, 3.0]]
    assert y1.tolist() == [-1.0, 1.0]  # labels 1/2: the larger becomes +1


@pytest.mark.parametrize("labels", [("0", "1"), ("1", "2"), ("-1", "+1"), ("-1", "1")])
def test_label_conventions(tmp_path, labels):
    low, high = labels
    _, y = load_libsvm(_write(tmp_path / "l.svm", f"{high} 1:1\n{low} 1:1\n{high} 2:1\n"))
    assert y.tolist() == [1.0, -1.0, 1.0]


def test_explicit_zeros_are_stored_and_n_features_pads(tmp_path):
    path = _write(tmp_path / "z.svm", "1 1:0 2:1\n-1 1:1\n-1\n")
    X, _ = load_libsvm(path, 4, sparse=True)
    assert X.shape == (3, 4) and X.values().numel() == 3
    assert X.crow_indices().tolist() == [0, 2, 3, 3]
    assert torch.equal(X.to_dense(), load_libsvm(path, 4)[0])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.integers(1, 20),
            st.floats(allow_nan=False, allow_infinity=False, width=64),
            max_size=8,
        ),
        min_size=2,
        max_size=12,
    ),
    st.randoms(use_true_random=False),
)
def test_round_trip(tmp_path_factory, rows, rng):
    labels = [rng.choice([-1, 1]) for _ in rows]
    labels[:2] = [-1, 1]  # both labels must occur
    lines = [
        " ".join([str(label)] + [f"{i}:{v!r}" for i, v in sorted(row.items())])
        for label, row in zip(labels, rows, strict=True)
    ]
    path = _write(tmp_path_factory.mktemp("rt") / "rt.svm", "\n".join(lines) + "\n")
    X, y = load_libsvm(path, 20)
    expected = torch.zeros(len(rows), 20, dtype=torch.float64)
    for r, row in enumerate(rows):
        for i, v in row.items():
            expected[r, i - 1] = v
    assert torch.equal(X, expected)
    assert y.tolist() == [float(label) for label in labels]


MALFORMED = [
    # (file content, n_features, expected message after "bad.svm")
    ("1 1:1\n-1 2:1\n1 x3:1\n", None, "line 3: feature index 'x3' is not an integer"),
    ("1 1:1 5\n-1 2:1\n", None, "line 1: token '5' is not of the form index:value"),
    ("1 1:1\n-1 2:1:3\n", None, "line 2: token '2:1:3' is not of the form"),
    ("1 1:1\n-1 2:\n", None, "line 2: token '2:' is not of the form"),
    ("1 1:1\n-1 :4\n", None, "line 2: token ':4' is not of the form"),
    ("1 1:abc\n-1 2:1\n", None, "line 1: feature value 'abc' is not a number"),
    ("1 1:1\n-1 0:1\n", None, "line 2: feature index 0 is not positive"),
    ("1 1:1\n-1 -2:1\n", None, "line 2: feature index -2 is not positive"),
    ("1 1:1\n-1 3:1 2:1\n", None, r"line 2: feature index 2 does not increase"),
    ("1 1:1\n-1 2:1 2:1\n", None, r"line 2: feature index 2 does not increase"),
    ("1 1:1\nabc 2:1\n", None, "line 2: label 'abc' is not a number"),
    ("1 1:1\nnan 2:1\n", None, "line 2: label 'nan' is not finite"),
    ("1 1:1\n-1 2:1\n1 4:1\n", 3, r"line 3: feature index 4 > n_features=3"),
    ("1 1:1\n-1 1:1\n2 1:1\n-1 2:1\n", None, r"line 3: a third distinct label.*-1, 1, 2"),
    ("1 1:1\n1 2:1\n", None, r"expected two distinct labels, found only 1"),
    ("1 1:1\n-1 1:nan\n", None, r"line 2: feature value in '1:nan' is not finite"),
    ("1 1:1\n-1 1:inf\n", None, r"line 2: feature value in '1:inf' is not finite"),
    ("# only a comment\n\n", None, "no data rows"),
    # Comments and blank lines still count for the line number.
    ("# header\n\n1 1:1\r\n-1 0:1\r\n", None, "line 4: feature index 0"),
    ("1 1:1\n-1 2:1\n1 99999999999999999999:1\n", None, "line 3: feature index 9+ is too large"),
]


@pytest.mark.parametrize(("text", "n_features", "message"), MALFORMED)
@pytest.mark.parametrize("compress", [False, True])
def test_malformed_input(tmp_path, text, n_features, message, compress):
    path = _write(tmp_path / "bad.svm", text, compress=compress)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r"(, |: )" + message):
        load_libsvm(path, n_features)


def test_negative_n_features(tmp_path):
    with pytest.raises(ValueError, match="n_features"):
        load_libsvm(_write(tmp_path / "ok.svm", "1 1:1\n-1 1:2\n"), -1)
