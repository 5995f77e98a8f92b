-- Indexes the web console's reads need to stay fast with many batches kept as history:
-- the list by run id and by batch id prefix, and the overview's last hour of
-- finalizations, read from the index alone. Each costs one index entry per batch.

-- Batches of one run, newest first (the list's `run` filter).
CREATE INDEX batches_run_idx ON batches (run_id, created_at DESC);

-- Batch ids by prefix (the list's search): LIKE 'prefix%' reads a range of this index.
CREATE INDEX batches_id_prefix_idx ON batches (batch_id text_pattern_ops);

-- Finalizations by time, with what the overview sums, so the last hour is an
-- index-only scan of that hour's entries.
CREATE INDEX run_summaries_completed_idx ON run_summaries (completed_at)
    INCLUDE (finalized_by, total_files, last_file_completed_at, created_at);
