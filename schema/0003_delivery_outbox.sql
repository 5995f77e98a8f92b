-- Completion callbacks: an outbox of events written by finalization, the webhook
-- subscriptions and the Python hook they go to, one delivery row per (event, sink) with
-- its lease and retry schedule, and a log row per attempt.

CREATE TABLE webhooks (
    webhook_id      text PRIMARY KEY,
    url             text NOT NULL,
    events          text[] NOT NULL,
    secret          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Set when the receiver answered 410 Gone: no new deliveries, pending ones stop.
    disabled_at     timestamptz,
    -- A 429 or a Retry-After slows every delivery to this webhook, not only one.
    paused_until    timestamptz
);

-- The Python hook (RECONCILER_ON_FINALIZED), registered by the first replica that runs
-- delivery with it set; from then on every finalization fans out to it too.
CREATE TABLE hook_registrations (
    sink          text PRIMARY KEY CHECK (sink = 'hook'),
    target        text NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now()
);

-- Written in the same statement that finalizes the batch: one event per finalization.
CREATE TABLE events (
    event_id   text PRIMARY KEY,
    batch_id   text NOT NULL REFERENCES batches (batch_id) ON DELETE CASCADE,
    type       text NOT NULL,
    data       jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    UNIQUE (batch_id, type)
);

CREATE TABLE deliveries (
    delivery_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        text NOT NULL REFERENCES events (event_id) ON DELETE CASCADE,
    sink            text NOT NULL CHECK (sink IN ('webhook', 'hook')),
    -- No foreign key: a deleted webhook keeps its delivery history (state `cancelled`).
    webhook_id      text CHECK ((sink = 'webhook') = (webhook_id IS NOT NULL)),
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'dead', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    -- When the next attempt is due; a claim moves it past the lease, so another
    -- replica's claim skips the row until the lease runs out.
    next_attempt_at timestamptz NOT NULL,
    finalized_at    timestamptz NOT NULL,
    claimed_by      text,
    delivered_at    timestamptz
);

CREATE UNIQUE INDEX deliveries_event_sink_idx
    ON deliveries (event_id, sink, coalesce(webhook_id, ''));
-- Undelivered rows only: the claim, the oldest-undelivered gauge, the cancel on delete.
CREATE INDEX deliveries_due_idx ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_undelivered_idx ON deliveries (finalized_at) WHERE state = 'pending';
CREATE INDEX deliveries_pending_webhook_idx ON deliveries (webhook_id) WHERE state = 'pending';

CREATE TABLE delivery_attempts (
    delivery_id bigint NOT NULL REFERENCES deliveries (delivery_id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('delivered', 'failed', 'dead')),
    status_code integer,
    error       text,
    latency_s   double precision NOT NULL,
    replica     text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX delivery_attempts_delivery_idx ON delivery_attempts (delivery_id, at);
