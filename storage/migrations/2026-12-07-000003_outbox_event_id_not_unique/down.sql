ALTER TABLE outbox ADD CONSTRAINT outbox_event_id_unique UNIQUE (event_id);
