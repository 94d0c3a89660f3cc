"""load_libsvm on damaged files, unusable dtypes and feature indices too large for a dense X."""

from __future__ import annotations

import gzip
import re

import pytest
import torch

from torch_rankone.data import load_libsvm

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

TEXT = b"".join(b"%d 1:0.5 3:%d\n" % (i % 2, i) for i in range(200))


def _damaged(tmp_path, how: str):
    packed = bytearray(gzip.compress(TEXT, mtime=0))
    if how == "truncated":  # EOFError from gzip
        packed = packed[: len(packed) // 2]
    elif how == "corrupt-stream":  # zlib.error: the deflate data right after the 10-byte header
        packed[11] ^= 0xFF
    else:  # "corrupt-crc": gzip.BadGzipFile from the trailer's checksum
        packed[len(packed) // 2] ^= 0xFF
    path = tmp_path / f"{how}.gz"
    path.write_bytes(bytes(packed))
    return path


@pytest.mark.parametrize("how", ["truncated", "corrupt-stream", "corrupt-crc"])
def test_damaged_gzip_raises_oserror_naming_the_file(tmp_path, how):
    path = _damaged(tmp_path, how)
    with pytest.raises(OSError, match=re.escape(str(path))) as info:
        load_libsvm(path)
    assert info.value.__cause__ is not None  # the decompressor's own error is chained


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_dtype_is_refused(tmp_path, dtype):
    path = tmp_path / "plain"
    path.write_bytes(TEXT)
    with pytest.raises(ValueError, match=re.escape(str(dtype))):
        load_libsvm(path, dtype=dtype)


@pytest.mark.parametrize(
    ("dtype", "value"),
    [(torch.float16, "70000"), (torch.bfloat16, "1e39"), (torch.float32, "-1e39")],
)
def test_value_overflowing_the_dtype_is_refused_naming_value_dtype_and_line(tmp_path, dtype, value):
    path = tmp_path / "big"
    path.write_text(f"1 1:0.5\n-1 2:{value}\n")
    with pytest.raises(ValueError, match=rf"line 2: .*{re.escape(value)}.*{dtype}"):
        load_libsvm(path, dtype=dtype)
    with pytest.raises(ValueError, match="overflow"):
        load_libsvm(path, dtype=dtype, sparse=True)


def test_low_precision_dtype_keeps_representable_values(tmp_path):
    path = tmp_path / "ok"
    path.write_text("1 1:0.5 2:65504\n-1 2:-3\n")  # 65504 is float16's largest finite value
    X, y = load_libsvm(path, dtype=torch.float16)
    assert X.dtype == y.dtype == torch.float16
    assert X.tolist() == [[0.5, 65504.0], [0.0, -3.0]]


def test_huge_feature_index_refuses_dense_and_names_index_line_and_remedy(tmp_path):
    path = tmp_path / "huge"
    path.write_text("1 1:1\n-1 2:1 200000000000:1\n")  # dense: 2 × 2e11 float64 = 3.2 TB
    with pytest.raises(ValueError) as info:
        load_libsvm(path)
    message = str(info.value)
    for part in (str(path), "line 2", "200000000000", "sparse=True", "n_features"):
        assert part in message, (part, message)


def test_huge_feature_index_sparse_allocates_no_dense_memory(tmp_path):
    path = tmp_path / "huge"
    path.write_text("1 1:1\n-1 2:1 200000000000:2\n")
    X, y = load_libsvm(path, sparse=True)
    assert X.shape == (2, 200_000_000_000)
    assert X.values().tolist() == [1.0, 1.0, 2.0]
    assert X.col_indices().tolist() == [0, 1, 199_999_999_999]
    assert y.tolist() == [1.0, -1.0]


def test_max_dense_bytes_bounds_the_dense_result(tmp_path):
    path = tmp_path / "small"
    path.write_text("1 1:1\n-1 2:1 100:1\n")  # dense: 2 × 100 × 8 = 1600 bytes
    assert load_libsvm(path, max_dense_bytes=1600)[0].shape == (2, 100)
    with pytest.raises(ValueError, match=r"line 2: feature index 100 .*max_dense_bytes=1599"):
        load_libsvm(path, max_dense_bytes=1599)
    with pytest.raises(ValueError, match=r"n_features=1000 .*max_dense_bytes=1600"):
        load_libsvm(path, 1000, max_dense_bytes=1600)
    assert load_libsvm(path, 1000, max_dense_bytes=None)[0].shape == (2, 1000)
    assert load_libsvm(path, 1000, sparse=True, max_dense_bytes=1)[0].shape == (2, 1000)
    with pytest.raises(ValueError, match="max_dense_bytes"):
        load_libsvm(path, max_dense_bytes=-1)
