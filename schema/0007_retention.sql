-- Retention: the sweeper deletes finalized batches older than RECONCILER_RETENTION_DAYS,
-- oldest first, a bounded chunk at a time. Finalized batches only, by completion time:
-- finding the oldest few reads the first entries of this index, however many batches
-- the table holds. Everything else a batch owns (files, summary, events, deliveries,
-- their attempts, audit rows) goes with it through ON DELETE CASCADE foreign keys, each
-- of which has an index leading with its key; a retry's parent_batch_id is set to null.
-- Built inside the migration's transaction: writes to `batches` wait while it builds
-- (seconds per million rows).

CREATE INDEX batches_finalized_idx ON batches (completed_at) WHERE status <> 'processing';
