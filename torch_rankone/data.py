"""Loading LIBSVM binary-classification datasets as tensors.

File format (LIBSVM / SVMlight text): one example per line,

    <label> <index>:<value> <index>:<value> ...

with 1-based feature indices that increase strictly within a line. Features that are not
listed are zero. The label may be any number, but a binary dataset must use exactly two
label values (LIBSVM files use -1/+1, 1/2 or 0/1); :func:`load_libsvm` maps the larger one
to +1 and the smaller one to -1. Also accepted: CRLF line endings, trailing spaces, blank
lines, ``#`` comments and SVMlight ``qid:`` tokens (ignored). A file may be gzip-compressed;
this is recognized by its content, not by its name.

:func:`libsvm` loads a dataset by name (``"a9a"``, ``"w8a"``, ``"mushrooms"``, ...) with its
canonical number of features. It looks for ``NAME`` (``NAME.t`` for the test split), plain or
with a ``.gz`` suffix, in these directories, in order (see :func:`data_dirs`):

1. the directory named by the environment variable ``TORCH_RANKONE_DATA``;
2. ``shared/data/libsvm`` in the current working directory or any of its ancestors, then
   in the directory of this package or any of its ancestors (so a checkout with the
   ``shared/`` folder inside it or next to it is found);
3. the user cache ``$XDG_CACHE_HOME/torch_rankone/libsvm`` (default
   ``~/.cache/torch_rankone/libsvm``).

If the file is in none of them and its SHA-256 is listed in :data:`SHA256`, it is downloaded
from the LIBSVM dataset page, checked against that hash and stored gzip-compressed in the
cache.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import urllib.request
import zlib
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CANONICAL_FEATURES",
    "MAX_DENSE_BYTES",
    "SHA256",
    "data_dirs",
    "find_libsvm",
    "libsvm",
    "load_libsvm",
]

#: Number of features of each known dataset. Training files need not use the last indices
#: (a1a stops at 119), so the count cannot be inferred from the file.
CANONICAL_FEATURES: dict[str, int] = {
    **{f"a{i}a": 123 for i in range(1, 10)},
    **{f"w{i}a": 300 for i in range(1, 9)},
    "madelon": 500,
    "mushrooms": 112,
    "phishing": 68,
}

#: SHA-256 of the uncompressed text of the files that may be downloaded automatically
#: (the copies in the project's ``shared/data/libsvm``, see its PROVENANCE.md).
SHA256: dict[str, str] = {
    "a1a": "eb54c45f1bdb51286f803dd092eb8202b44637a858fc6c4e533a2d64a0d94b4e",
    "a1a.t": "0212d0c4a3996fe6fb6a0ab54033d9f4fa4b60369b6e3bb141821d9ffc40c04d",
    "a2a": "535782f1be62e60938d8accb1573043542b3ac11265522927574dcbb28360a2f",
    "a2a.t": "5b4cd01725b4c364acda943067b4b859a48f1b9c43207f828b8e15e1e0f09767",
    "a7a": "d383cf150d4d9f9097b91cc88022cd0ac473c3a72da3f33b4c17801a4bfccdc6",
    "a9a": "f5d5ffd8d865ff41328e7ee043e4b020816914ff6843ff15b98905ddbedce906",
    "a9a.t": "1f448a153f0320399a7e40836eb207655b0bde0f21fc941cc472193daa9f5de9",
    "w1a": "0ae2b1c40f6a99061d1c6f4a1f3b50eea58a2f3b8bf851a337c25c2a65a49d32",
    "w1a.t": "c5e489a499286d69c8c2035cb04bc48e2ea1f73e56153c72cc50b29732a9316a",
    "w8a": "6a9fa8fd5f524303240a5db07d4b3d4a51e8b7b4b20a914105d8e3e8c81640f2",
    "w8a.t": "618929ecb01bebb841daec4cae4aa07b97832d29b08652452775598929547fde",
    "mushrooms": "f39a4eb628dc61a7d43760815b061c9e497aa728ce1ad8bde57a09ef6043b538",
    "phishing": "0cf66ef36604c393da9359b2e5d894a2df8aee31fd184633cefa138add2ef08a",
    "madelon.t": "ae60251b63a46c6ace348b77749e79e25d4098d629d1dead2852c3d4daf1f8ea",
}

_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary"
_DOWNLOAD_TIMEOUT_S = 20.0
_GZIP_MAGIC = b"\x1f\x8b"
# Tokens are joined by single spaces, so this finds a token with two or more colons.
_TWO_COLONS = re.compile(r":[^ ]*:")
#: Default bound on the size of a dense ``X`` (see :func:`load_libsvm`).
MAX_DENSE_BYTES = 8 * 2**30


def load_libsvm(
    path: str | os.PathLike[str],
    n_features: int | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    sparse: bool = False,
    max_dense_bytes: int | None = MAX_DENSE_BYTES,
) -> tuple[Tensor, Tensor]:
    """Read a binary-classification dataset in LIBSVM/SVMlight text format.

    Args:
        path: The file, plain text or gzip-compressed (detected from its first bytes).
        n_features: Number of columns of ``X``. ``None`` uses the largest index in the file.
        dtype: Floating dtype of ``X`` and ``y`` (float64, float32, float16, bfloat16, ...).
            Values are rounded to it; a value whose magnitude exceeds the dtype's range
            (e.g. above 65504 in float16) is refused rather than stored as ``inf``.
        sparse: Return ``X`` as a ``torch.sparse_csr`` tensor instead of a dense one. It
            stores exactly the entries listed in the file (explicit zeros included), so its
            memory does not depend on the number of columns.
        max_dense_bytes: Largest dense ``X`` (``rows × n_features × itemsize`` bytes, default
            8 GiB) that is allocated; a larger one is refused. One stray huge feature index
            would otherwise ask for terabytes. ``None`` disables the bound; it does not apply
            to ``sparse=True``.

    Returns:
        ``(X, y)``: ``X`` of shape ``(n_rows, n_features)`` and ``y`` of shape ``(n_rows,)``
        with the larger of the two label values mapped to +1 and the smaller to -1.

    Raises:
        ValueError: If the file is malformed (the message names the file and line), has no
            rows, does not have exactly two distinct labels, uses an index above
            ``n_features``, has a value out of ``dtype``'s range, or the dense ``X`` would
            exceed ``max_dense_bytes``; or if ``dtype`` is not a floating dtype.
        OSError: If the file cannot be read or decompressed (the message names the file).
    """
    if n_features is not None and n_features < 0:
        raise ValueError(f"n_features must be non-negative, got {n_features}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        # An integer dtype would truncate 0.5 to 0 without a word.
        raise ValueError(f"dtype must be a floating dtype such as torch.float32, got {dtype}")
    if max_dense_bytes is not None and max_dense_bytes < 0:
        raise ValueError(f"max_dense_bytes must be non-negative or None, got {max_dense_bytes}")
    path = Path(path)
    text = _decompress(path.read_bytes(), str(path)).decode("utf-8", errors="replace")
    dense_limit = None if sparse else max_dense_bytes
    label, counts, index, values = _parse(text, str(path), n_features, dtype, dense_limit)
    if n_features is None:
        n_features = int(index.max()) if index.size else 0
    elif dense_limit is not None and len(counts) * n_features * values.element_size() > dense_limit:
        raise ValueError(
            f"{path}: n_features={n_features} makes the dense X "
            + _dense_size(len(counts), n_features, dtype, dense_limit)
            + "; pass sparse=True or a larger max_dense_bytes"
        )

    shape = (len(counts), n_features)
    columns = torch.from_numpy(index - 1)
    if sparse:
        X = torch.sparse_csr_tensor(
            torch.from_numpy(np.concatenate(([0], np.cumsum(counts)))),
            columns,
            values,
            size=shape,
            check_invariants=False,  # _parse has checked the indices already
        )
    else:
        rows = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
        X = torch.zeros(shape, dtype=dtype).index_put_((rows, columns), values)
    return X, torch.from_numpy(label).to(dtype)


def data_dirs() -> list[Path]:
    """The directories searched for dataset files, in search order.

    Returns:
        ``$TORCH_RANKONE_DATA`` (when set), every existing ``shared/data/libsvm`` found by
        walking up from the working directory and from this package's directory, and the
        user cache directory (whether or not it exists yet). Duplicates are removed.
    """
    dirs = []
    if os.environ.get("TORCH_RANKONE_DATA"):
        dirs.append(Path(os.environ["TORCH_RANKONE_DATA"]).expanduser())
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        # Checking every ancestor A for A/shared also covers A/../shared for each A, i.e.
        # a shared/ folder beside the checkout as well as one inside it.
        for ancestor in (start, *start.parents):
            candidate = ancestor / "shared" / "data" / "libsvm"
            if candidate.is_dir():
                dirs.append(candidate)
    dirs.append(_cache_dir())
    unique: dict[Path, Path] = {}
    for d in dirs:
        unique.setdefault(d.resolve(), d)
    return list(unique.values())


def find_libsvm(name: str, split: str = "train") -> Path | None:
    """Find a dataset file in :func:`data_dirs` without downloading anything.

    Args:
        name: Dataset name, e.g. ``"a9a"``; any file name is looked up.
        split: ``"train"`` for the file ``name`` or ``"test"`` for ``name.t``.

    Returns:
        The first existing ``<dir>/<file>`` or ``<dir>/<file>.gz``, or ``None``.

    Raises:
        ValueError: If ``split`` is not ``"train"`` or ``"test"``.
    """
    file = _file_name(name, split)
    for directory in data_dirs():
        for candidate in (directory / file, directory / f"{file}.gz"):
            if candidate.is_file():
                return candidate
    return None


def libsvm(
    name: str,
    *,
    split: str = "train",
    n_features: int | None = None,
    dtype: torch.dtype = torch.float64,
    sparse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Load a known LIBSVM dataset by name, downloading it to the cache if needed.

    Args:
        name: One of :data:`CANONICAL_FEATURES` (a1a-a9a, w1a-w8a, madelon, mushrooms,
            phishing).
        split: ``"train"`` or ``"test"`` (the official ``NAME.t`` file).
        n_features: Number of columns; ``None`` uses the canonical count for ``name``.
        dtype: Floating dtype of ``X`` and ``y``.
        sparse: Return ``X`` as a ``torch.sparse_csr`` tensor.

    Returns:
        ``(X, y)`` as returned by :func:`load_libsvm`.

    Raises:
        ValueError: If ``name`` or ``split`` is unknown, or the file is malformed.
        FileNotFoundError: If the file is not in :func:`data_dirs` and cannot be downloaded;
            the message lists the directories searched and how to provide the file.
    """
    if name not in CANONICAL_FEATURES:
        raise ValueError(f"unknown LIBSVM dataset {name!r}; known: {', '.join(CANONICAL_FEATURES)}")
    path = find_libsvm(name, split) or _download_to_cache(_file_name(name, split))
    if n_features is None:
        n_features = CANONICAL_FEATURES[name]
    return load_libsvm(path, n_features, dtype=dtype, sparse=sparse)


def _file_name(name: str, split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return name if split == "train" else f"{name}.t"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "torch_rankone" / "libsvm"


def _decompress(data: bytes, source: str) -> bytes:
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # bad CRC, truncated, corrupt stream
        raise OSError(f"{source}: cannot decompress the gzip data: {exc}") from exc


def _download(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _download_to_cache(file: str) -> Path:
    """Download ``file`` from the LIBSVM page into the cache, or explain how to get it."""
    url = f"{_URL}/{file}"
    expected = SHA256.get(file)
    if expected is None:
        reason = f"No SHA-256 is known for {file!r}, so it is not downloaded automatically."
    else:
        try:
            text = _decompress(_download(url, _DOWNLOAD_TIMEOUT_S), url)
        except OSError as exc:
            reason = f"Downloading {url} failed: {exc}"
        else:
            digest = hashlib.sha256(text).hexdigest()
            if digest == expected:
                target = _cache_dir() / f"{file}.gz"
                target.parent.mkdir(parents=True, exist_ok=True)
                # Write then rename, so an interrupted download never leaves a partial file.
                partial = target.with_name(f"{target.name}.{os.getpid()}.part")
                partial.write_bytes(gzip.compress(text, mtime=0))
                os.replace(partial, target)
                return target
            reason = f"The file downloaded from {url} has SHA-256 {digest}, expected {expected}."
    searched = "\n".join(f"  {d}" for d in data_dirs())
    raise FileNotFoundError(
        f"LIBSVM file {file!r} (or {file}.gz) was not found. Searched, in order:\n{searched}\n"
        f"{reason}\n"
        f"To fix this, download {url} and put it (optionally gzip-compressed as {file}.gz) "
        "into one of these directories, or set the environment variable TORCH_RANKONE_DATA "
        "to a directory that holds it."
    )


def _token_error(token: str) -> str | None:
    """What is wrong with one ``index:value`` token, or ``None`` if it is valid."""
    index, colon, value = token.partition(":")
    if not (colon and index and value) or ":" in value:
        return f"token {token!r} is not of the form index:value"
    try:
        i = int(index)
    except ValueError:
        return f"feature index {index!r} is not an integer"
    if i < 1:
        return f"feature index {i} is not positive (indices are 1-based)"
    if i >= 2**63:
        return f"feature index {i} is too large"
    try:
        float(value)
    except ValueError:
        return f"feature value {value!r} is not a number"
    return None


def _parse(
    text: str,
    source: str,
    n_features: int | None,
    dtype: torch.dtype = torch.float64,
    max_dense_bytes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Tensor]:
    """Parse LIBSVM text into (labels as +-1, nonzeros per row, 1-based indices, values).

    The values come back converted to ``dtype``. ``max_dense_bytes`` bounds the dense
    ``rows × columns`` matrix (``None``: no bound).
    """
    lines = text.split("\n")
    if "#" in text:
        lines = [line.partition("#")[0] for line in lines]
    has_qid = "qid:" in text
    labels: list[str] = []
    tokens: list[str] = []
    counts: list[int] = []
    line_of_row: list[int] = []
    # The only per-line Python work: splitting. Numbers are converted in bulk below.
    for lineno, line in enumerate(lines, 1):
        fields = line.split()  # also drops a trailing "\r"
        if not fields:
            continue
        features = fields[1:]
        if has_qid:
            features = [t for t in features if not t.startswith("qid:")]
        labels.append(fields[0])
        tokens += features
        counts.append(len(features))
        line_of_row.append(lineno)
    if not labels:
        raise ValueError(f"{source}: no data rows")
    count = np.array(counts, dtype=np.int64)
    row_of_token = np.repeat(np.arange(len(count)), count)

    def fail_row(row: int, message: str) -> NoReturn:
        raise ValueError(f"{source}, line {line_of_row[row]}: {message}")

    # Fast path: every token has exactly one colon with text on both sides iff the colon
    # count matches, no token has two, and replacing colons by spaces gives 2 fields each.
    joined = " ".join(tokens)
    numbers = joined.replace(":", " ").split()
    index = value = None
    if (
        joined.count(":") == len(tokens)
        and len(numbers) == 2 * len(tokens)
        and not _TWO_COLONS.search(joined)
    ):
        try:
            index = np.array(list(map(int, numbers[0::2])), dtype=np.int64)
            value = np.array(numbers[1::2], dtype=np.float64)
        except (ValueError, OverflowError):
            pass
    if index is None or value is None:
        # Slow path, only for broken files: the first token that fails the per-token check.
        bad, message = next((k, m) for k, t in enumerate(tokens) if (m := _token_error(t)))
        fail_row(row_of_token[bad], message)

    try:
        label = np.array(labels, dtype=np.float64)
    except ValueError:
        bad = next(r for r, s in enumerate(labels) if _not_a_number(s))
        fail_row(bad, f"label {labels[bad]!r} is not a number")
    if not np.isfinite(label).all():
        bad = int(np.argmin(np.isfinite(label)))
        fail_row(bad, f"label {labels[bad]!r} is not finite")

    # Per-entry checks, vectorized; report the earliest offending entry in the file.
    increasing = np.ones(len(index), dtype=bool)
    increasing[1:] = index[1:] > index[:-1]
    increasing[np.cumsum(count)[count > 0] - count[count > 0]] = True  # row starts
    checks = [
        (index < 1, lambda k: f"feature index {index[k]} is not positive (indices are 1-based)"),
        (
            ~increasing,
            lambda k: f"feature index {index[k]} does not increase (previous {index[k - 1]})",
        ),
        (~np.isfinite(value), lambda k: f"feature value in {tokens[k]!r} is not finite"),
    ]
    values = torch.from_numpy(value).to(dtype)
    if dtype != torch.float64:  # the values are finite float64 numbers already
        checks.append(
            (
                ~torch.isfinite(values).numpy(),
                lambda k: (
                    f"feature value in {tokens[k]!r} overflows {dtype} (its largest "
                    f"finite value is {torch.finfo(dtype).max:g}); use a wider dtype"
                ),
            )
        )
    if n_features is not None:
        checks.append(
            (index > n_features, lambda k: f"feature index {index[k]} > n_features={n_features}")
        )
    itemsize = dtype.itemsize
    if max_dense_bytes is not None and n_features is None:
        # Widest X that fits; a larger index is reported at its line before anything is allocated.
        columns = max_dense_bytes // (itemsize * len(labels))
        checks.append(
            (
                index > columns,
                lambda k: (
                    f"feature index {index[k]} makes the dense X "
                    + _dense_size(len(labels), int(index[k]), dtype, max_dense_bytes)
                    + "; pass sparse=True, n_features= (the true width: a stray index is then "
                    "reported), or a larger max_dense_bytes"
                ),
            )
        )
    offenders = [(int(np.argmax(mask)), describe) for mask, describe in checks if mask.any()]
    if offenders:
        bad, describe = min(offenders, key=lambda offender: offender[0])
        fail_row(row_of_token[bad], describe(bad))

    distinct, first_row = np.unique(label, return_index=True)
    if len(distinct) == 1:
        raise ValueError(
            f"{source}: expected two distinct labels, found only {distinct[0]:g} "
            f"(on all {len(label)} rows)"
        )
    if len(distinct) > 2:
        found = ", ".join(f"{v:g}" for v in distinct)
        fail_row(
            int(np.sort(first_row)[2]),
            f"a third distinct label appears; expected two, the file has {found}",
        )
    return np.where(label == distinct[1], 1.0, -1.0), count, index, values


def _dense_size(rows: int, columns: int, dtype: torch.dtype, limit: int) -> str:
    size = rows * columns * dtype.itemsize
    return f"{rows} × {columns} {dtype} ({size / 2**30:.3g} GiB), above max_dense_bytes={limit}"


def _not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False
