"""Click-log data: schema and id policy, Parquet streaming, batches, generators."""
