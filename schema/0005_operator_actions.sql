-- Operator actions: a cancel finalizes a batch as `operator`, a retry of its failed
-- files makes a child batch linked by `parent_batch_id`, and each writes an audit row.
-- Also the names the original design note's SQL reads: the view `processing_jobs` and
-- `run_summaries.success_files`.

ALTER TABLE batches DROP CONSTRAINT batches_finalized_by_check;
ALTER TABLE batches ADD CONSTRAINT batches_finalized_by_check
    CHECK (finalized_by IN ('event', 'sweep', 'demand', 'deadline', 'operator'));

-- A retry's batch points at the batch whose failed files it runs again; deleting the
-- parent (retention) keeps the child.
ALTER TABLE batches ADD COLUMN parent_batch_id text
    REFERENCES batches (batch_id) ON DELETE SET NULL;
CREATE INDEX batches_parent_idx ON batches (parent_batch_id)
    WHERE parent_batch_id IS NOT NULL;

CREATE TABLE operator_actions (
    action_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id  text NOT NULL REFERENCES batches (batch_id) ON DELETE CASCADE,
    action    text NOT NULL CHECK (action IN ('cancel', 'retry_failed')),
    reason    text NOT NULL CHECK (length(reason) BETWEEN 1 AND 2000),
    -- Who asked: the API token's name or the CLI's --actor; never a secret.
    actor     text NOT NULL,
    -- What came of it: the files cancelled, or the batch a retry created.
    detail    jsonb NOT NULL DEFAULT '{}'::jsonb,
    at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX operator_actions_batch_idx ON operator_actions (batch_id, at);

-- The note's `success_files` is our `files_succeeded`: generated, so never different.
ALTER TABLE run_summaries
    ADD COLUMN success_files integer GENERATED ALWAYS AS (files_succeeded) STORED;

-- The note's `processing_jobs` was its batches table: the same rows under its names.
CREATE VIEW processing_jobs AS
SELECT batch_id, run_id, status, total_files, files_succeeded AS success_files,
       files_failed AS failed_files, created_at, completed_at, finalized_by, parent_batch_id
FROM batches;
