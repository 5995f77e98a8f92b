-- Batches, their files and the run summaries, with the indexes the sweeper relies on.
-- Every sweeper query reads a partial index over unfinished rows only, so its cost
-- does not grow with the number of finished batches and files kept as history.

CREATE TABLE batches (
    batch_id               text PRIMARY KEY CHECK (length(batch_id) BETWEEN 1 AND 256),
    run_id                 text NOT NULL,
    status                 text NOT NULL DEFAULT 'processing'
                           CHECK (status IN ('processing', 'completed', 'completed_with_errors')),
    metadata               jsonb NOT NULL DEFAULT '{}'::jsonb,
    files_digest           text NOT NULL,
    total_files            integer NOT NULL CHECK (total_files >= 0),
    files_succeeded        integer NOT NULL DEFAULT 0,
    files_failed           integer NOT NULL DEFAULT 0,
    deadline_at            timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    last_file_completed_at timestamptz,
    completed_at           timestamptz,
    finalized_by           text CHECK (finalized_by IN ('event', 'sweep', 'demand', 'deadline')),
    CHECK (files_succeeded + files_failed <= total_files),
    CHECK ((status = 'processing') = (completed_at IS NULL))
);

-- Unfinalized batches only: the sweeper's and the gauges' whole search space.
CREATE INDEX batches_unfinalized_idx ON batches (created_at) WHERE status = 'processing';
CREATE INDEX batches_created_at_idx ON batches (created_at DESC);

CREATE TABLE batch_files (
    batch_id         text NOT NULL REFERENCES batches (batch_id) ON DELETE CASCADE,
    file_id          text NOT NULL CHECK (length(file_id) BETWEEN 1 AND 1024),
    uri              text NOT NULL,
    payload          jsonb,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'processing', 'succeeded', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    enqueued_at      timestamptz,
    worker           text,
    lease_expires_at timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    duration_s       double precision,
    result           jsonb,
    error            text,
    PRIMARY KEY (batch_id, file_id)
);

-- Pending files waiting for a job, oldest first: the re-enqueue pass.
CREATE INDEX batch_files_pending_idx ON batch_files (enqueued_at NULLS FIRST)
    WHERE status = 'pending';
-- In-flight files by lease: the reclaim pass and lease renewal.
CREATE INDEX batch_files_leases_idx ON batch_files (lease_expires_at)
    WHERE status = 'processing';
CREATE INDEX batch_files_worker_idx ON batch_files (worker) WHERE status = 'processing';

CREATE TABLE run_summaries (
    batch_id               text PRIMARY KEY REFERENCES batches (batch_id) ON DELETE CASCADE,
    run_id                 text NOT NULL,
    status                 text NOT NULL,
    finalized_by           text NOT NULL,
    total_files            integer NOT NULL,
    files_succeeded        integer NOT NULL,
    files_failed           integer NOT NULL,
    created_at             timestamptz NOT NULL,
    first_file_started_at  timestamptz,
    last_file_completed_at timestamptz,
    completed_at           timestamptz NOT NULL,
    processing_seconds     jsonb NOT NULL,
    errors                 jsonb NOT NULL,
    totals                 jsonb NOT NULL,
    metadata               jsonb NOT NULL
);

-- The original design note's monitoring queries read this view; keep its column names.
CREATE VIEW batch_status_summary AS
SELECT
    b.batch_id,
    b.run_id,
    b.status,
    b.total_files,
    b.total_files - b.files_succeeded - b.files_failed - coalesce(p.processing, 0)
        AS files_pending,
    coalesce(p.processing, 0) AS files_processing,
    b.files_succeeded AS files_success,
    b.files_failed,
    b.created_at,
    b.last_file_completed_at,
    b.completed_at,
    b.finalized_by
FROM batches b
LEFT JOIN LATERAL (
    SELECT count(*)::integer AS processing
    FROM batch_files f
    WHERE f.batch_id = b.batch_id AND f.status = 'processing'
) p ON b.status = 'processing';
