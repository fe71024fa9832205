-- The store-wide authorization epoch: every commit that revokes, suspends or patches an agent or
-- gives one a new key moves it on. A gateway lease is used only while the epoch read after the
-- call arrived is the one read before the lease was granted, so a revocation committed by any
-- replica stops the next proxied call on every replica.
CREATE TABLE authz_epoch (
    id  INTEGER PRIMARY KEY,
    n   BIGINT  NOT NULL
);
INSERT INTO authz_epoch (id, n) VALUES (1, 0);
