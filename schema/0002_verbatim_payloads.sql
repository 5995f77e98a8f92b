-- A lost job is rebuilt byte for byte: payloads become `json`, which keeps the
-- submitted text verbatim (jsonb would rewrite 1e300 as 301 digits, 1e16 as 17).

ALTER TABLE batch_files ALTER COLUMN payload TYPE json USING payload::json;
