-- The resource store of the global control plane: resources, the change feed (events), the
-- revision counter that orders it, and the control plane's own system values.
--
-- Names compare bytewise (COLLATE "C") so that list order and keyset pagination match the
-- other store backends whatever the database's locale is.

CREATE TABLE resources (
    kind              text COLLATE "C" NOT NULL,
    -- '' for global-scoped kinds.
    mesh              text COLLATE "C" NOT NULL,
    name              text COLLATE "C" NOT NULL,
    version           bigint      NOT NULL CHECK (version > 0),
    labels            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    spec              jsonb       NOT NULL,
    creation_time     timestamptz NOT NULL,
    modification_time timestamptz NOT NULL,
    PRIMARY KEY (kind, mesh, name)
);

-- Label selectors: `labels @> '{"k":"v"}'` and `labels ? 'k'`.
CREATE INDEX resources_labels ON resources USING gin (labels);
-- Deleting a mesh deletes everything in it.
CREATE INDEX resources_mesh ON resources (mesh) WHERE mesh <> '';

-- The change feed: one row per change, revisions contiguous and in commit order (every write
-- takes the lock on the counter row below first and holds it until it commits).
CREATE TABLE events (
    revision bigint PRIMARY KEY,
    op       text   NOT NULL CHECK (op IN ('create', 'update', 'delete')),
    kind     text   COLLATE "C" NOT NULL,
    mesh     text   COLLATE "C" NOT NULL,
    name     text   COLLATE "C" NOT NULL,
    -- The resource's version after the change (for a delete: the version deleted).
    version  bigint NOT NULL,
    -- The resource document after the change; NULL for deletes.
    resource jsonb,
    time     timestamptz NOT NULL DEFAULT now()
);

-- The single-row revision counter: the latest revision written.
CREATE TABLE revision (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    revision bigint  NOT NULL CHECK (revision >= 0)
);
INSERT INTO revision (id, revision) VALUES (true, 0);

-- Secrets and settings of the control plane itself.
CREATE TABLE system (
    key   text PRIMARY KEY,
    value text NOT NULL
);
