-- The harness's own statements, as reviewed text: "-- name: <query_name>" blocks with
-- positional parameters only. They read the service's tables from outside, as an
-- operator's SQL would, and fill throwaway databases with history.

-- name: finalized_count
SELECT count(*) FROM batches WHERE status <> 'processing';

-- name: run_totals
SELECT (SELECT count(*) FROM batches) AS batches,
       (SELECT count(*) FROM batches WHERE status = 'processing') AS unfinalized,
       (SELECT count(*) FROM run_summaries) AS summaries,
       (SELECT coalesce(sum(total_files), 0) FROM run_summaries) AS summary_files,
       (SELECT coalesce(sum(files_succeeded + files_failed), 0) FROM run_summaries)
           AS summary_files_done,
       (SELECT coalesce(sum(files_failed), 0) FROM run_summaries) AS summary_files_failed,
       (SELECT count(*) FROM batch_files) AS file_rows,
       (SELECT count(*) FROM batch_files WHERE status NOT IN ('succeeded', 'failed'))
           AS files_unfinished;

-- name: run_wall_s
-- First batch created -> last summary committed, on the database's clock.
SELECT extract(epoch FROM (SELECT max(completed_at) FROM run_summaries)
                          - (SELECT min(created_at) FROM batches))::double precision;

-- name: latency_by_trigger
-- Finalization latency: last file recorded -> run summary committed, per trigger.
SELECT finalized_by AS trigger, count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
       max(ms) AS max
FROM (
    SELECT finalized_by,
           1000 * extract(epoch FROM completed_at - coalesce(last_file_completed_at, created_at))
               ::double precision AS ms
    FROM run_summaries
) s
GROUP BY finalized_by
ORDER BY finalized_by;

-- name: jobs_enqueued
SELECT count(*) FROM batch_files WHERE status = 'pending' AND enqueued_at IS NOT NULL;

-- name: fill_batches
-- History batches $1..$2, finalized $5 days ago (a millisecond apart, oldest first);
-- batch g has $3 files, plus one when g <= $4.
INSERT INTO batches (batch_id, run_id, status, files_digest, total_files, files_succeeded,
                     files_failed, created_at, last_file_completed_at, completed_at,
                     finalized_by)
SELECT id, id, 'completed', 'history', n, n, 0, t, t + interval '1 second',
       t + interval '1010 milliseconds', 'event'
FROM (
    SELECT 'hist-' || lpad(g::text, 9, '0') AS id, $3::integer + (g <= $4)::integer AS n,
           now() - make_interval(days => $5::integer) + g * interval '1 millisecond' AS t
    FROM generate_series($1::bigint, $2::bigint) g
) s;

-- name: fill_files
-- The succeeded files of history batches $1..$2, matching fill_batches' counts and times.
INSERT INTO batch_files (batch_id, file_id, uri, status, attempts, enqueued_at,
                         started_at, finished_at, duration_s)
SELECT 'hist-' || lpad(g::text, 9, '0'), 'file-' || k, 'bench://history/' || g || '/' || k,
       'succeeded', 1, t, t, t + interval '1 second', 0.001
FROM (
    SELECT g, $3::integer + (g <= $4)::integer AS n,
           now() - make_interval(days => $5::integer) + g * interval '1 millisecond' AS t
    FROM generate_series($1::bigint, $2::bigint) g
) s, generate_series(1, s.n) k;

-- name: fill_summaries
-- The run summary of each history batch $1..$2: one per finalized batch, as in service.
INSERT INTO run_summaries (batch_id, run_id, status, finalized_by, total_files,
                           files_succeeded, files_failed, created_at, first_file_started_at,
                           last_file_completed_at, completed_at, processing_seconds, errors,
                           totals, metadata)
SELECT b.batch_id, b.run_id, b.status, b.finalized_by, b.total_files, b.files_succeeded,
       b.files_failed, b.created_at, b.created_at, b.last_file_completed_at, b.completed_at,
       jsonb_build_object('count', b.total_files, 'sum', 0.001 * b.total_files),
       '[]'::jsonb, '{}'::jsonb, '{}'::jsonb
FROM generate_series($1::bigint, $2::bigint) g
JOIN batches b ON b.batch_id = 'hist-' || lpad(g::text, 9, '0');

-- name: fill_events
-- The `batch.finalized` event of each history batch $1..$2, as finalization writes it
-- (no delivery rows: no webhook was subscribed).
INSERT INTO events (event_id, batch_id, type, data, created_at)
SELECT 'evt_hist_' || g, b.batch_id, 'batch.finalized', '{}'::jsonb, b.completed_at
FROM generate_series($1::bigint, $2::bigint) g
JOIN batches b ON b.batch_id = 'hist-' || lpad(g::text, 9, '0');

-- name: seed_unfinished_batches
-- $1 batches still processing, $2 files each, a third of them already succeeded;
-- every other one has a deadline far ahead. Nothing here is due for repair.
INSERT INTO batches (batch_id, run_id, files_digest, total_files, files_succeeded,
                     deadline_at, last_file_completed_at)
SELECT 'open-' || g, 'open-' || g, 'open', $2::integer, $2::integer / 3,
       CASE WHEN g % 2 = 0 THEN now() + interval '1 day' END, now()
FROM generate_series(1, $1::integer) g;

-- name: seed_unfinished_files
-- File k of each open batch: succeeded when k % 3 = 0, in flight under a live lease
-- when k % 3 = 1, pending and freshly enqueued when k % 3 = 2.
INSERT INTO batch_files (batch_id, file_id, uri, status, attempts, enqueued_at,
                         worker, lease_expires_at, started_at, finished_at, duration_s)
SELECT 'open-' || g, 'file-' || k, 'bench://open/' || g || '/' || k,
       (ARRAY['succeeded', 'processing', 'pending'])[k % 3 + 1],
       CASE WHEN k % 3 = 2 THEN 0 ELSE 1 END,
       now(),
       CASE WHEN k % 3 = 1 THEN 'bench-worker' END,
       CASE WHEN k % 3 = 1 THEN now() + interval '1 hour' END,
       CASE WHEN k % 3 < 2 THEN now() END,
       CASE WHEN k % 3 = 0 THEN now() END,
       CASE WHEN k % 3 = 0 THEN 0.001 END
FROM generate_series(1, $1::integer) g, generate_series(1, $2::integer) k;

-- name: history_left
-- What is left of the history after retention ran: its batches, and every file row.
SELECT (SELECT count(*) FROM batches WHERE files_digest = 'history') AS batches,
       (SELECT count(*) FROM batch_files) AS file_rows,
       (SELECT count(*) FROM batches WHERE status = 'processing') AS unfinalized;

-- name: vacuum_analyze
VACUUM (ANALYZE);

-- name: analyze
ANALYZE;

-- name: table_scans
-- How each table was read during the run: sequential scans that grow with the table
-- show up here (the harness's progress poll adds one scan of batches per poll).
SELECT relname AS table, seq_scan, seq_tup_read, idx_scan, idx_tup_fetch, n_tup_ins,
       n_tup_upd, n_tup_hot_upd, n_dead_tup
FROM pg_stat_user_tables
ORDER BY relname;

-- name: database_activity
-- Transactions and row work of the run's database (read once the service stopped, so
-- every backend has flushed its counters); includes the harness's own statements.
SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_fetched,
       tup_returned, blks_hit, blks_read
FROM pg_stat_database
WHERE datname = current_database();

-- name: delivered_count
-- Deliveries acknowledged with a 2xx so far.
SELECT count(*) FROM deliveries WHERE state = 'delivered';

-- name: delivery_latency
-- Delivery latency: finalization -> the 2xx recorded, per delivered event, in ms.
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
       max(ms) AS max
FROM (SELECT 1000 * extract(epoch FROM delivered_at - finalized_at)::double precision AS ms
      FROM deliveries WHERE state = 'delivered') AS delivered;

-- name: completed_epoch
-- When the batch's run summary was written, in seconds since the epoch.
SELECT extract(epoch FROM completed_at)::double precision FROM run_summaries
WHERE batch_id = $1;

-- name: delivered_events
-- Each delivered event with its finalization time, in seconds since the epoch.
SELECT event_id, extract(epoch FROM finalized_at)::double precision AS finalized_s
FROM deliveries WHERE state = 'delivered';

-- name: event_ids
-- The id of every event written (one per finalized batch).
SELECT event_id FROM events;
