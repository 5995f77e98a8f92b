-- The outbox's commit order for the event streams: each event keeps the id of the
-- transaction that wrote it. Every event whose transaction id is below the oldest
-- running transaction (the snapshot's xmin) is committed or gone for good, so a reader
-- that streams only those, in (txid, event_id) order, resumes from a cursor exactly.

ALTER TABLE events ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();

CREATE INDEX events_stream_idx ON events (txid, event_id);
