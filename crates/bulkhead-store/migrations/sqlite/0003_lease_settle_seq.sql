-- The last settlement applied to a gateway lease, numbered by its gateway: a settlement retried
-- after a commit whose outcome was unknown is applied once.
ALTER TABLE holds ADD COLUMN settled_seq BIGINT NOT NULL DEFAULT 0;
