"""The reader takes pyarrow.fs URIs as well as local paths."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.parquet import ParquetStream
from data.schema import FeatureSpec, Schema


def test_file_uri_reads_the_same_rows_as_the_local_path(tmp_path):
    n = 50
    table = pa.table({"label": pa.array(np.arange(n) % 2), "d": pa.array(np.arange(n, dtype=np.float32)),
                      "c": pa.array(np.arange(n, dtype=np.int64) * 3)})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=16)
    schema = Schema(("label",), ("d",), (FeatureSpec("c", 100),))

    def rows(uri):
        stream = ParquetStream(uri, schema, batch_size=8)
        return np.concatenate([b.dense[:, 0].numpy() for b in stream])

    local, uri = rows(str(tmp_path)), rows(f"file://{tmp_path}")
    assert np.array_equal(local, uri)
    assert sorted(local.tolist()) == list(range(n))
