-- A file's batch is checked once per statement and batch, not once per file row.
-- The foreign key batch_files -> batches looked its batch up for every file inserted:
-- with 50 files, 0.25-0.45 ms of a submission statement's 0.6-1.1 ms (EXPLAIN ANALYZE).
-- Statement-level triggers keep what it kept: an insert whose batch does not exist
-- fails with foreign_key_violation (SQLSTATE 23503), and deleting batches deletes their
-- files, as ON DELETE CASCADE did; a file's batch_id cannot change.
-- What the key did that these do not: hold a KEY SHARE lock on the batch while its
-- files are written. Every statement that writes files writes their batch in the same
-- transaction (submission, an operator's retry), so no other transaction can see the
-- batch, let alone delete it, before they commit.
-- Each batch is read or deleted by key, one statement per batch: a plan over the
-- transition table as a whole could be cached from a time the tables were small.

ALTER TABLE batch_files DROP CONSTRAINT batch_files_batch_id_fkey;

CREATE FUNCTION reconciler_files_have_batches() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    wanted text;
BEGIN
    -- Each batch the statement's new files name, once.
    FOR wanted IN SELECT DISTINCT w.batch_id FROM written_files w LOOP
        -- The batch itself, by key.
        PERFORM 1 FROM batches b WHERE b.batch_id = wanted;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'insert on table "batch_files" names batch %, which does not exist',
                            quote_literal(wanted)
                USING ERRCODE = 'foreign_key_violation';
        END IF;
    END LOOP;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER batch_files_have_batches AFTER INSERT ON batch_files
    REFERENCING NEW TABLE AS written_files
    FOR EACH STATEMENT EXECUTE FUNCTION reconciler_files_have_batches();

CREATE FUNCTION reconciler_delete_batch_files() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    gone text;
BEGIN
    -- Each batch the statement deleted.
    FOR gone IN SELECT d.batch_id FROM deleted_batches d LOOP
        -- Its files, by the primary key's first column.
        DELETE FROM batch_files f WHERE f.batch_id = gone;
    END LOOP;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER batches_delete_files AFTER DELETE ON batches
    REFERENCING OLD TABLE AS deleted_batches
    FOR EACH STATEMENT EXECUTE FUNCTION reconciler_delete_batch_files();

CREATE FUNCTION reconciler_file_batch_fixed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'a file''s batch_id never changes (file %)', quote_literal(OLD.file_id)
        USING ERRCODE = 'foreign_key_violation';
END
$fn$;

CREATE TRIGGER batch_files_batch_fixed BEFORE UPDATE OF batch_id ON batch_files
    FOR EACH ROW WHEN (OLD.batch_id IS DISTINCT FROM NEW.batch_id)
    EXECUTE FUNCTION reconciler_file_batch_fixed();
