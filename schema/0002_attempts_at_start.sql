-- Attempts are spent when the handler starts, and a lost job is rebuilt byte for byte.
-- `start_key` names the start that spent the current attempt, so a retried start
-- statement spends nothing more; payloads become `json`, which keeps the submitted
-- text verbatim (jsonb would rewrite 1e300 as 301 digits).

ALTER TABLE batch_files ADD COLUMN start_key text;
ALTER TABLE batch_files ALTER COLUMN payload TYPE json USING payload::json;
