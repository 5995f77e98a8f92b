-- `reconciler_finalize` plans its statements once per connection and keeps the plans.
-- Every statement inside reaches its rows through a key (the batch's primary key, the
-- batch's files by the leading primary-key column, the webhooks subscribed), so the
-- generic plan is the plan a custom one would be, without planning on each call (under
-- the default, `auto`, Postgres plans a statement anew while its custom plans are
-- estimated cheaper than the generic one).
ALTER FUNCTION reconciler_finalize(text, text, text, text, integer)
    SET plan_cache_mode = force_generic_plan;
