-- Every statement the service runs, as reviewed text. Each block starts with
-- "-- name: <query_name>" and takes positional parameters only ($1, $2, ...).

-- name: insert_batch
-- Creates batch $1 (run $2, metadata $3, digest $4, $5 files, deadline $6 s from now);
-- returns its id, or no row when the id is taken.
INSERT INTO batches (batch_id, run_id, metadata, files_digest, total_files, deadline_at)
VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6::double precision))
ON CONFLICT (batch_id) DO NOTHING
RETURNING batch_id;

-- name: batch_digest
-- The files digest of batch $1, to tell a resubmission from a conflict.
SELECT files_digest FROM batches WHERE batch_id = $1;

-- name: insert_files
-- A batch's files. $1 batch, $2 file ids, $3 uris, $4 payloads as the exact JSON text
-- embedded in their jobs (the `json` column keeps it verbatim, so a lost job can be
-- rebuilt byte for byte; a json[] parameter would read a list as an array dimension),
-- or NULL when no file has one (unnest pads a NULL array with NULLs).
-- $5 false leaves `enqueued_at` NULL (written in a caller's transaction, no job yet):
-- enqueue_committed or the sweeper's next pass enqueues them.
INSERT INTO batch_files (batch_id, file_id, uri, payload, enqueued_at)
SELECT $1, f.file_id, f.uri, f.payload::json, CASE WHEN $5::boolean THEN now() END
FROM unnest($2::text[], $3::text[], $4::text[]) AS f (file_id, uri, payload);

-- name: insert_batch_with_files
-- `insert_batch` and `insert_files` in one statement (one round trip, atomic on its own):
-- $1-$6 as insert_batch, $7-$10 as insert_files' $2-$5. Returns the new batch's id, or
-- no row (and no files written) when the id is taken. The files' batch is checked at
-- the end of the statement, when the batch row is there (schema/0012).
WITH batch AS (
    INSERT INTO batches (batch_id, run_id, metadata, files_digest, total_files, deadline_at)
    VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6::double precision))
    ON CONFLICT (batch_id) DO NOTHING
    RETURNING batch_id
), files AS (
    INSERT INTO batch_files (batch_id, file_id, uri, payload, enqueued_at)
    SELECT b.batch_id, f.file_id, f.uri, f.payload::json,
           CASE WHEN $10::boolean THEN now() END
    FROM batch b, unnest($7::text[], $8::text[], $9::text[]) AS f (file_id, uri, payload)
)
SELECT batch_id FROM batch;

-- name: batch_total_files
-- Batch $1's number of files, or no row if there is no such (committed) batch.
SELECT total_files FROM batches WHERE batch_id = $1;

-- name: claim_batch_unqueued_files
-- Claims batch $1's pending files that were never enqueued, after file id $2, at most
-- $3, in key order: setting `enqueued_at` is the claim, as in claim_unqueued_files, so
-- a sweep running at the same time skips them. Payloads come back as submitted.
WITH due AS (
    SELECT batch_id, file_id FROM batch_files
    WHERE batch_id = $1 AND file_id > $2 AND status = 'pending' AND enqueued_at IS NULL
    ORDER BY file_id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE batch_files f SET enqueued_at = now()
FROM due d
WHERE f.batch_id = d.batch_id AND f.file_id = d.file_id
RETURNING f.batch_id, f.file_id, f.uri, f.payload::text AS payload;

-- name: peek_files
-- Where each delivered file stands before its handler may start, read without a write.
-- $1 batch ids, $2 file ids, $3 this worker. Returns one row per input position:
-- known; status and attempts started so far; `held`, another worker's live lease.
SELECT i.pos, (f.file_id IS NOT NULL) AS known, f.status, f.attempts,
       coalesce(f.status = 'processing' AND f.worker IS DISTINCT FROM $3
                AND f.lease_expires_at >= now(), false) AS held
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS i (batch_id, file_id, pos)
LEFT JOIN batch_files f ON f.batch_id = i.batch_id AND f.file_id = i.file_id
ORDER BY i.pos;

-- name: record_starts
-- Records attempts whose handler has started and not finished by the next flush (a fast
-- file's attempt is written with its outcome instead): in flight under worker $4 with a
-- lease of $5 seconds. $1 batch ids, $2 file ids, $3 the attempt each started; a
-- retried statement writes the same values again. Terminal files are left alone.
UPDATE batch_files f
SET status = 'processing', attempts = greatest(f.attempts, i.attempt), worker = $4,
    lease_expires_at = now() + make_interval(secs => $5::double precision),
    started_at = coalesce(f.started_at, now())
FROM unnest($1::text[], $2::text[], $3::integer[]) AS i (batch_id, file_id, attempt)
WHERE f.batch_id = i.batch_id AND f.file_id = i.file_id
  AND f.status IN ('pending', 'processing');

-- name: record_outcomes
-- Writes many file outcomes in one statement and moves the per-batch counters.
-- Only files not yet terminal change, so a redelivered job is never counted twice.
-- Returns each touched batch and whether its last file is now terminal, and notifies
-- `reconciler_progress` with its new counts. $1..$7: per file the batch, file id,
-- success, result JSON text, error, handler seconds and attempts started; $4 or $5 is
-- NULL when every file's is (unnest pads a NULL array with NULLs).
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::boolean[], $4::text[], $5::text[],
                         $6::double precision[], $7::integer[])
        AS i (batch_id, file_id, ok, result, error, duration_s, attempts)
), done AS (
    UPDATE batch_files f
    SET status = CASE WHEN i.ok THEN 'succeeded' ELSE 'failed' END,
        result = i.result::jsonb, error = i.error, duration_s = i.duration_s,
        attempts = greatest(f.attempts, i.attempts),
        finished_at = now(), lease_expires_at = NULL, worker = NULL
    FROM input i
    WHERE f.batch_id = i.batch_id AND f.file_id = i.file_id
      AND f.status IN ('pending', 'processing')
    RETURNING f.batch_id, i.ok
), counts AS (
    SELECT batch_id, count(*) FILTER (WHERE ok) AS ok, count(*) FILTER (WHERE NOT ok) AS bad
    FROM done GROUP BY batch_id
), moved AS (
    UPDATE batches b
    SET files_succeeded = b.files_succeeded + c.ok, files_failed = b.files_failed + c.bad,
        last_file_completed_at = now()
    FROM counts c
    -- Unfinalized, said as `completed_at IS NULL` (the same, by the batches_check1
    -- constraint) so no plan reaches the batches through the partial index of the
    -- unfinalized ones: a cached plan that did read every unfinalized batch per flush.
    WHERE b.batch_id = c.batch_id AND b.completed_at IS NULL
    RETURNING b.batch_id, b.total_files, b.files_succeeded, b.files_failed
)
-- NOTIFY is sent at commit: listeners wake once the new counts are visible.
SELECT batch_id, files_succeeded + files_failed = total_files AS complete,
       pg_notify('reconciler_progress', json_build_object(
           'batch_id', batch_id, 'total_files', total_files,
           'files_succeeded', files_succeeded, 'files_failed', files_failed)::text) AS notified
FROM moved;

-- name: renew_leases
-- Extends the leases of every file this worker ($1) runs by $2 seconds.
UPDATE batch_files
SET lease_expires_at = now() + make_interval(secs => $2::double precision)
WHERE status = 'processing' AND worker = $1;

-- name: batch_for_update
-- Batch $1, its row locked to commit (an operator's retry reads the parent this way).
SELECT batch_id, run_id, status, total_files, files_succeeded, files_failed,
       deadline_at, deadline_at IS NOT NULL AND deadline_at <= now() AS deadline_passed,
       created_at, last_file_completed_at, metadata
FROM batches WHERE batch_id = $1 FOR UPDATE;

-- name: finalize
-- Finalizes each of batches $1 that the database says is done, one after the other in
-- one statement (schema/0013_finalize_by_key_to_subscribers.sql: each under its own
-- lock, from its own state): $2 trigger, $3 the reason past-deadline files fail with,
-- $4 the reason unfinished files fail with now (an operator's cancel) or null, $5 how
-- many error groups to keep; up to $7 webhook deliveries of each finalized batch are
-- handed to replica $6, claimed for $8 seconds (none when $6 is null). One row per
-- batch, in the order given.
SELECT b.batch_id, f.outcome, f.status, f.total_files, f.files_succeeded, f.files_failed,
       f.files_remaining, f.latency_s, f.event_id, f.event_created_at, f.event_data,
       f.handed
FROM unnest($1::text[]) WITH ORDINALITY AS b (batch_id, pos),
     LATERAL reconciler_finalize(b.batch_id, $2, $3, $4, $5, $6, $7, $8) f
ORDER BY b.pos;

-- name: get_summary
SELECT batch_id, run_id, status, finalized_by, total_files, files_succeeded, files_failed,
       created_at, first_file_started_at, last_file_completed_at, completed_at,
       processing_seconds, errors, totals, metadata
FROM run_summaries WHERE batch_id = $1;

-- name: get_progress
-- Batch $1's progress: file counts by state, timestamps, how and by what it finalized.
SELECT s.batch_id, s.run_id, s.status, s.total_files, s.files_pending, s.files_processing,
       s.files_success AS files_succeeded, s.files_failed, s.created_at,
       s.last_file_completed_at, s.completed_at, s.finalized_by, b.deadline_at, b.metadata,
       b.parent_batch_id
FROM batch_status_summary s JOIN batches b USING (batch_id)
WHERE s.batch_id = $1;

-- name: stuck_batches
-- The original note's stuck-batch query: every file terminal, batch not finalized,
-- last completion older than the grace period.
SELECT batch_id, run_id, total_files, files_succeeded, files_failed,
       last_file_completed_at,
       extract(epoch FROM now() - coalesce(last_file_completed_at, created_at))
           AS seconds_since_last_file
FROM batches
WHERE status = 'processing'
  AND files_succeeded + files_failed = total_files
  AND coalesce(last_file_completed_at, created_at)
      < now() - make_interval(secs => $1::double precision)
ORDER BY coalesce(last_file_completed_at, created_at)
LIMIT $2;

-- name: deadline_batches
SELECT batch_id FROM batches
WHERE status = 'processing' AND deadline_at <= now()
ORDER BY deadline_at
LIMIT $1;

-- name: expired_leases
-- Files whose worker stopped renewing its lease: back to pending, keeping the attempt
-- it had started; $1 max attempts (spent ones are left to `exhausted_leases`), $2 limit.
WITH expired AS (
    SELECT batch_id, file_id, attempts FROM batch_files
    WHERE status = 'processing' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE batch_files f
SET status = 'pending', worker = NULL, lease_expires_at = NULL, enqueued_at = now()
FROM expired e
WHERE f.batch_id = e.batch_id AND f.file_id = e.file_id AND e.attempts < $1
RETURNING f.batch_id, f.file_id;

-- name: exhausted_leases
-- Files whose worker died while running their last attempt; $1 max attempts, $2 limit.
SELECT batch_id, file_id, attempts FROM batch_files
WHERE status = 'processing' AND lease_expires_at < now() AND attempts >= $1
ORDER BY lease_expires_at
LIMIT $2;

-- name: claim_unqueued_files
-- Claims pending files never enqueued (written in a caller's transaction) or enqueued
-- longer ago than $1 seconds (a crash between commit and enqueue, or Redis lost the
-- job), at most $2: moving `enqueued_at` is the claim, so another replica's sweep
-- skips them until the grace passes again. Payloads come back as submitted.
WITH due AS (
    SELECT batch_id, file_id FROM batch_files
    WHERE status = 'pending'
      AND (enqueued_at IS NULL
           OR enqueued_at < now() - make_interval(secs => $1::double precision))
    ORDER BY enqueued_at NULLS FIRST
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE batch_files f SET enqueued_at = now()
FROM due d
WHERE f.batch_id = d.batch_id AND f.file_id = d.file_id
RETURNING f.batch_id, f.file_id, f.uri, f.payload::text AS payload;

-- name: unfinished_files
-- After Redis lost its data: every unfinished file of an unfinalized batch, pending or
-- in flight, in key order after ($1, $2), at most $3; payloads as submitted.
SELECT f.batch_id, f.file_id, f.uri, f.payload::text AS payload
FROM batches b
JOIN batch_files f ON f.batch_id = b.batch_id
WHERE b.status = 'processing' AND f.status IN ('pending', 'processing')
  AND (f.batch_id, f.file_id) > ($1, $2)
ORDER BY f.batch_id, f.file_id
LIMIT $3;

-- name: gauges
SELECT count(*) AS in_progress,
       count(*) FILTER (
           WHERE files_succeeded + files_failed = total_files
             AND coalesce(last_file_completed_at, created_at)
                 < now() - make_interval(secs => $1::double precision)) AS stuck,
       coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest_age_s
FROM batches WHERE status = 'processing';

-- name: blocking_files
SELECT file_id, uri, status, attempts, worker, lease_expires_at,
       lease_expires_at < now() AS lease_expired, error
FROM batch_files
WHERE batch_id = $1 AND status IN ('pending', 'processing')
ORDER BY file_id
LIMIT $2;

-- name: ping
SELECT 1;

-- name: session_settings
-- Cached-page costs for every pooled connection, so primary-key joins win over scans.
SELECT set_config('random_page_cost', '1.1', false);

-- name: array_codecs
-- Binds one of each array type (but text[]) that the other statements bind or return:
-- preparing it makes asyncpg look their codecs up in the catalog, once per connection.
-- Behind a transaction pooler that is done inside a transaction, because asyncpg switches
-- `jit` off and back on at session level around the lookup.
SELECT $1::integer[], $2::boolean[], $3::double precision[], $4::bigint[];

-- name: record_migration
INSERT INTO schema_migrations (version, name) VALUES ($1, $2);

-- name: applied_migrations
SELECT version FROM schema_migrations ORDER BY version;

-- name: migrations_table_exists
SELECT to_regclass('schema_migrations') IS NOT NULL;

-- name: migration_lock
SELECT pg_advisory_xact_lock($1);

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: release_leases
-- On a stop: this worker's ($1) unfinished files go back to pending at once. A file in
-- ($2 batch ids, $3 file ids) had its handler cut short by the stop during attempt $4:
-- that attempt is given back, since a stop never spends an attempt.
UPDATE batch_files f
SET status = 'pending', worker = NULL, lease_expires_at = NULL, enqueued_at = now(),
    attempts = coalesce(
        (SELECT least(f.attempts, i.attempt - 1)
         FROM unnest($2::text[], $3::text[], $4::integer[]) AS i (batch_id, file_id, attempt)
         WHERE i.batch_id = f.batch_id AND i.file_id = f.file_id),
        f.attempts)
WHERE f.status = 'processing' AND f.worker = $1;

-- name: insert_webhook
-- A webhook subscription: $1 id, $2 url, $3 event types, $4 signing secret.
INSERT INTO webhooks (webhook_id, url, events, secret) VALUES ($1, $2, $3, $4)
RETURNING webhook_id, url, events, created_at;

-- name: list_webhooks
-- Every subscription, oldest first, without its secret.
SELECT webhook_id, url, events, created_at, disabled_at IS NULL AS enabled, disabled_at,
       paused_until
FROM webhooks ORDER BY created_at, webhook_id;

-- name: delete_webhook
-- Deletes webhook $1 and cancels its undelivered deliveries (their history stays).
-- Returns the number of webhooks deleted, 0 or 1.
WITH gone AS (
    DELETE FROM webhooks WHERE webhook_id = $1 RETURNING webhook_id
), cancelled AS (
    UPDATE deliveries SET state = 'cancelled', claimed_by = NULL
    WHERE webhook_id IN (SELECT webhook_id FROM gone) AND state = 'pending'
)
SELECT count(*) FROM gone;

-- name: disable_webhook
-- The receiver of webhook $1 answered 410 Gone: no new deliveries, pending ones cancelled.
WITH off AS (
    UPDATE webhooks SET disabled_at = coalesce(disabled_at, now()) WHERE webhook_id = $1
)
UPDATE deliveries SET state = 'cancelled', claimed_by = NULL
WHERE webhook_id = $1 AND state = 'pending';

-- name: pause_webhook
-- Holds every delivery to webhook $1 for $2 seconds (a 429 or a Retry-After).
UPDATE webhooks
SET paused_until = greatest(coalesce(paused_until, now()),
                            now() + make_interval(secs => $2::double precision))
WHERE webhook_id = $1;

-- name: register_hook
-- From now on every finalization also fans out to the Python hook $1 (module:function).
INSERT INTO hook_registrations (sink, target) VALUES ('hook', $1)
ON CONFLICT (sink) DO UPDATE SET target = EXCLUDED.target;

-- name: claim_deliveries
-- Claims under claim id $1 (the replica's name, or its name and the claim's number) up
-- to $2 due deliveries: the claim counts the attempt and moves `next_attempt_at` $3
-- seconds ahead (the lease), so other replicas skip the row until it runs out; rows
-- another replica is claiming right now are skipped too. Hook rows
-- only when $4 (this replica runs the hook); never to a paused or disabled webhook.
-- Returns what an attempt needs: the event, and the webhook's URL and secret.
WITH due AS (
    SELECT d.delivery_id
    FROM deliveries d
    LEFT JOIN webhooks w ON w.webhook_id = d.webhook_id
    WHERE d.state = 'pending' AND d.next_attempt_at <= now()
      AND CASE WHEN d.sink = 'hook' THEN $4::boolean
               ELSE w.disabled_at IS NULL AND coalesce(w.paused_until <= now(), true) END
    ORDER BY d.next_attempt_at
    LIMIT $2
    FOR UPDATE OF d SKIP LOCKED
), claimed AS (
    UPDATE deliveries d
    SET attempts = d.attempts + 1, claimed_by = $1,
        next_attempt_at = now() + make_interval(secs => $3::double precision)
    FROM due
    WHERE d.delivery_id = due.delivery_id
    RETURNING d.delivery_id, d.event_id, d.sink, d.webhook_id, d.attempts, d.finalized_at,
              d.claimed_by
)
SELECT c.delivery_id, c.event_id, c.sink, c.webhook_id, c.attempts AS attempt,
       c.finalized_at, c.claimed_by, e.batch_id, e.type, e.data, e.created_at, w.url, w.secret
FROM claimed c
JOIN events e ON e.event_id = c.event_id
LEFT JOIN webhooks w ON w.webhook_id = c.webhook_id
ORDER BY c.finalized_at;

-- name: deliveries_delivered
-- Deliveries $1 acknowledged by their attempts $2 (HTTP statuses $3, null for a hook;
-- $4 seconds each; replicas $5; the 2xx came $6 seconds before this statement), every
-- attempt logged, in one statement; returns the age at the 2xx (finalization to
-- acknowledgement) of each delivery this settled, the first time only.
WITH answered AS (
    SELECT * FROM unnest($1::bigint[], $2::integer[], $3::integer[],
                         $4::double precision[], $5::text[], $6::double precision[])
        AS a(delivery_id, attempt, status_code, latency_s, replica, ago_s)
), done AS (
    UPDATE deliveries d
    SET state = 'delivered', delivered_at = now() - make_interval(secs => a.ago_s),
        claimed_by = NULL
    FROM answered a
    WHERE d.delivery_id = a.delivery_id AND d.state = 'pending'
    RETURNING d.delivery_id, extract(epoch FROM d.delivered_at - d.finalized_at) AS age_s
), logged AS (
    INSERT INTO delivery_attempts (
        delivery_id, attempt, outcome, status_code, error, latency_s, replica)
    SELECT delivery_id, attempt, 'delivered', status_code, NULL, latency_s, replica
    FROM answered
)
SELECT delivery_id, age_s FROM done;

-- name: delivery_failed
-- Attempt $2 of delivery $1 failed: due again in $3 seconds, but never later than $4
-- seconds after finalization; a failure at or past that moment makes it `dead`. Only
-- the claim that made attempt $2 moves the row (a later claim owns it otherwise).
-- Returns the new state.
UPDATE deliveries
SET state = CASE WHEN finalized_at + make_interval(secs => $4::double precision) <= now()
                 THEN 'dead' ELSE 'pending' END,
    next_attempt_at = least(now() + make_interval(secs => $3::double precision),
                            finalized_at + make_interval(secs => $4::double precision)),
    claimed_by = NULL
WHERE delivery_id = $1 AND state = 'pending' AND attempts = $2
RETURNING state;

-- name: log_attempt
-- One attempt of delivery $1: $2 its number, $3 delivered/failed/dead, $4 the HTTP
-- status (null for a hook or no answer), $5 the error, $6 seconds it took, $7 the
-- replica that made it.
INSERT INTO delivery_attempts (
    delivery_id, attempt, outcome, status_code, error, latency_s, replica)
VALUES ($1, $2, $3, $4, $5, $6, $7);

-- name: delivery_gauges
-- Age of the oldest event still undelivered to some sink, 0 when none.
SELECT coalesce(extract(epoch FROM now() - min(finalized_at)), 0) AS oldest_undelivered_s
FROM deliveries WHERE state = 'pending';

-- name: batch_delivery_attempts
-- Every delivery attempt of batch $1's events, in the order they were made.
SELECT d.event_id, d.sink, d.webhook_id, CASE WHEN d.sink = 'hook' THEN h.target END AS hook,
       a.attempt, a.outcome, a.outcome = 'delivered' AS delivered, a.status_code, a.error,
       a.latency_s, a.replica, a.at
FROM events e
JOIN deliveries d ON d.event_id = e.event_id
JOIN delivery_attempts a ON a.delivery_id = d.delivery_id
LEFT JOIN hook_registrations h ON d.sink = 'hook'
WHERE e.batch_id = $1
ORDER BY a.at, d.delivery_id, a.attempt;

-- name: batch_deliveries
-- Where each delivery of batch $1's events stands, one row per (event, sink).
SELECT d.event_id, d.sink, d.webhook_id, CASE WHEN d.sink = 'hook' THEN h.target END AS hook,
       d.state, d.attempts, d.delivered_at,
       CASE WHEN d.state = 'pending' THEN d.next_attempt_at END AS next_attempt_at
FROM events e
JOIN deliveries d ON d.event_id = e.event_id
LEFT JOIN hook_registrations h ON d.sink = 'hook'
WHERE e.batch_id = $1
ORDER BY d.delivery_id;

-- name: release_delivery
-- A stop cut attempt $2 of delivery $1 short: due again at once, for any replica.
UPDATE deliveries SET next_attempt_at = now(), claimed_by = NULL
WHERE delivery_id = $1 AND attempts = $2 AND state = 'pending';

-- name: release_unanswered
-- Batches $1 were finalized by a statement whose reply replica $2 never got: the
-- webhook deliveries it handed to $2 (claimed, first attempt counted, none made) are due
-- again at once for any replica, as after a stop, instead of when their lease runs out.
UPDATE deliveries d SET next_attempt_at = now(), claimed_by = NULL
FROM events e
WHERE e.batch_id = ANY($1::text[]) AND d.event_id = e.event_id
  AND d.claimed_by = $2 AND d.attempts = 1 AND d.state = 'pending'
RETURNING d.delivery_id;

-- name: release_claim
-- A claim whose reply never came (claim id $1): what it leased (attempt counted, none
-- made) is due again at once for any replica, as after a stop, instead of when its
-- lease runs out. It reads only pending rows (a partial index of them), and runs only
-- after a failed claim.
UPDATE deliveries SET next_attempt_at = now(), claimed_by = NULL
WHERE claimed_by = $1 AND state = 'pending'
RETURNING delivery_id;

-- name: lock_batch
-- Waits for batch $1's advisory lock (the one finalization tries), held to commit.
SELECT pg_advisory_xact_lock(hashtextextended('reconciler.batch:' || $1, 0));

-- name: insert_operator_action
-- The audit row of an operator action: $1 batch, $2 action, $3 reason, $4 actor,
-- $5 what came of it (json).
INSERT INTO operator_actions (batch_id, action, reason, actor, detail)
VALUES ($1, $2, $3, $4, $5)
RETURNING action, reason, actor, detail, at;

-- name: batch_audit
-- Every operator action on batch $1, oldest first.
SELECT action, reason, actor, detail, at
FROM operator_actions WHERE batch_id = $1
ORDER BY at, action_id;

-- name: failed_files
-- The failed files of batch $1 with their payloads as submitted, in key order.
SELECT file_id, uri, payload::text AS payload
FROM batch_files WHERE batch_id = $1 AND status = 'failed'
ORDER BY file_id;

-- name: copy_failed_files
-- A retry: the failed files of batch $1 as pending files of batch $2, payloads verbatim.
INSERT INTO batch_files (batch_id, file_id, uri, payload, enqueued_at)
SELECT $2, file_id, uri, payload, now()
FROM batch_files WHERE batch_id = $1 AND status = 'failed';

-- name: set_parent_batch
-- Links retry batch $1 to the batch $2 whose failed files it runs again.
UPDATE batches SET parent_batch_id = $2 WHERE batch_id = $1;

-- name: batch_lineage
-- Batch $1's parent and files digest: tells a repeated retry from a conflicting id.
SELECT parent_batch_id, files_digest FROM batches WHERE batch_id = $1;

-- name: batch_finalized_event
-- The `batch.finalized` event of batch $1 from the outbox, if it is finalized.
SELECT event_id, data FROM events WHERE batch_id = $1 AND type = 'batch.finalized';

-- name: stream_start
-- Where a stream of finalized events starts when it resumes from nothing: at the
-- horizon (see finalized_events_after), below which every event has already happened.
-- Takes no parameter.
WITH snap AS (SELECT pg_current_snapshot() AS s),
foreign_xids AS (
    SELECT backend_xid::text::bigint AS xid FROM pg_stat_activity
    WHERE backend_xid IS NOT NULL
      AND datid IS DISTINCT FROM (SELECT oid FROM pg_database WHERE datname = current_database())
)
SELECT coalesce(
           (SELECT min(x) FROM pg_snapshot_xip(snap.s) AS x
            WHERE x::text::bigint % 4294967296 NOT IN (SELECT xid FROM foreign_xids)),
           pg_snapshot_xmax(snap.s))::text AS txid,
       '' AS event_id
FROM snap;

-- name: stream_cursor
-- The stream position of event $1 (a resumed stream's Last-Event-ID), if it still exists.
SELECT txid::text AS txid, event_id FROM events WHERE event_id = $1;

-- name: finalized_events_after
-- Up to $3 finalized events after the cursor ($1 transaction id as text, $2 event id),
-- in commit-safe order: only events of transactions below the horizon, the oldest
-- transaction still running in this snapshot that may be this database's (one running
-- in another database, as pg_stat_activity says, cannot write an event and must not
-- hold the stream back); below it no earlier event can ever appear later.
WITH snap AS (SELECT pg_current_snapshot() AS s),
foreign_xids AS (
    SELECT backend_xid::text::bigint AS xid FROM pg_stat_activity
    WHERE backend_xid IS NOT NULL
      AND datid IS DISTINCT FROM (SELECT oid FROM pg_database WHERE datname = current_database())
),
horizon AS (
    SELECT coalesce(
               (SELECT min(x) FROM pg_snapshot_xip(snap.s) AS x
                WHERE x::text::bigint % 4294967296 NOT IN (SELECT xid FROM foreign_xids)),
               pg_snapshot_xmax(snap.s)) AS txid
    FROM snap
)
SELECT event_id, batch_id, data, txid::text AS txid
FROM events
WHERE type = 'batch.finalized'
  AND txid < (SELECT txid FROM horizon)
  AND (txid, event_id) > ($1::text::xid8, $2::text)
ORDER BY txid, event_id
LIMIT $3;

-- name: list_batches
-- A page of batches (the API's list and the web console's), newest first, by keyset on
-- (created_at, batch_id) so batches created in the same instant are neither skipped
-- nor repeated (the API's `before` cursor passes '' as $7: created before $6): $1 status,
-- $2 stuck only, $3 stuck grace seconds, $4 run id, $5 a LIKE pattern `prefix%` of the
-- batch id (each null for any), $6 and $7 the last row shown (null for the first
-- page), $8 the page size. Indexes: schema/0008_console_indexes.sql.
SELECT s.batch_id, s.run_id, s.status, s.total_files, s.files_pending, s.files_processing,
       s.files_success AS files_succeeded, s.files_failed, s.created_at,
       s.last_file_completed_at, s.completed_at, s.finalized_by
FROM batch_status_summary s
WHERE ($1::text IS NULL OR s.status = $1)
  AND (NOT $2::boolean OR (s.status = 'processing'
       AND s.files_success + s.files_failed = s.total_files
       AND coalesce(s.last_file_completed_at, s.created_at)
           < now() - make_interval(secs => $3::double precision)))
  AND ($4::text IS NULL OR s.run_id = $4)
  AND ($5::text IS NULL OR s.batch_id LIKE $5)
  AND ($6::timestamptz IS NULL OR (s.created_at, s.batch_id) < ($6, $7::text))
ORDER BY s.created_at DESC, s.batch_id DESC
LIMIT $8;

-- name: console_batch_files
-- A page of batch $1's files in key order after file id $3 ('' for the first page),
-- only those in status $2 (null for all), at most $4: what each attempt came to.
SELECT file_id, uri, status, attempts, worker, started_at, finished_at, duration_s, error
FROM batch_files
WHERE batch_id = $1 AND ($2::text IS NULL OR status = $2) AND file_id > $3
ORDER BY file_id
LIMIT $4;

-- name: console_child_batches
-- The batches that retried batch $1's failed files, oldest first.
SELECT batch_id, status, total_files, created_at
FROM batches WHERE parent_batch_id = $1
ORDER BY created_at, batch_id;

-- name: console_finalized_since
-- Batches finalized at or after $1, by bucket of $2 seconds since the epoch and trigger:
-- how many, the files they held, and their finalization latency (last file done to
-- finalized) summed. Reads run_summaries_completed_idx alone; date_part, not extract,
-- so the sums are double precision rather than numeric.
SELECT floor(date_part('epoch', completed_at) / $2)::bigint AS bucket, finalized_by,
       count(*) AS batches, sum(total_files) AS files,
       sum(date_part('epoch', completed_at - coalesce(last_file_completed_at, created_at)))
           AS latency_sum_s
FROM run_summaries
WHERE completed_at >= $1
GROUP BY bucket, finalized_by;

-- name: console_undelivered
-- Deliveries not yet acknowledged by their sink, and the age of the oldest.
SELECT count(*) AS undelivered,
       coalesce(extract(epoch FROM now() - min(finalized_at)), 0) AS oldest_undelivered_s
FROM deliveries WHERE state = 'pending';

-- name: delete_expired_batches
-- Retention: deletes finalized batches completed more than $1 days ago and not before
-- $4 (where the caller's last statement ended: the index entries of the batches deleted
-- before it are dead until VACUUM, and are not walked again), oldest first, at most $2
-- batches and, after the first, at most $3 files in all, with everything they own
-- (files by the trigger of schema/0012; summary, events, deliveries and their attempts,
-- audit rows: ON DELETE CASCADE); a retry batch of one keeps its rows, its
-- parent_batch_id set to null. Batches another transaction holds are skipped, so
-- replicas never wait on each other, and so is a batch whose event a sink is being sent
-- right now (a live delivery claim). Never a batch still processing. Returns how many batches and files went, the
-- completion time of the newest one, and the moment before which batches were due
-- (where the next statement starts once this one found no more than it deleted).
WITH candidates AS (
    SELECT b.batch_id, b.total_files, b.completed_at
    FROM batches b
    WHERE b.status <> 'processing'
      AND b.completed_at < now() - make_interval(days => $1::integer)
      AND b.completed_at >= $4::timestamptz
      AND NOT EXISTS (
          SELECT 1 FROM events e JOIN deliveries d ON d.event_id = e.event_id
          WHERE e.batch_id = b.batch_id AND d.state = 'pending'
            AND d.claimed_by IS NOT NULL AND d.next_attempt_at > now())
    ORDER BY b.completed_at
    LIMIT $2
    FOR UPDATE OF b SKIP LOCKED
), chunk AS (
    SELECT batch_id
    FROM (
        SELECT batch_id,
               sum(total_files) OVER (ORDER BY completed_at, batch_id) - total_files AS before
        FROM candidates
    ) c
    WHERE c.before < $3
), gone AS (
    DELETE FROM batches b
    USING chunk c
    WHERE b.batch_id = c.batch_id AND b.status <> 'processing'
    RETURNING b.total_files, b.completed_at
)
SELECT count(*)::integer AS batches, coalesce(sum(total_files), 0)::bigint AS files,
       max(completed_at) AS last_completed_at,
       now() - make_interval(days => $1::integer) AS due_before
FROM gone;
