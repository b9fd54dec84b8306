-- A controller database of schema version 1 (hpcllm before model pools), for the v1 -> v2 upgrade test in
-- test_registry.py. The DDL is version 1's schema verbatim (registry/store.py at commit eeb6b6b); the rows were
-- written by that version's Registry (a deployed model, a running allocation, two registered nodes, n1 with an NVMe
-- copy and a ready instance, one cold start) and dumped. Portable SQL: the test runs it on SQLite and PostgreSQL.
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    deployed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    agent_url TEXT NOT NULL,
    slurm_job_id TEXT,
    job_scoped INTEGER NOT NULL,
    gpus INTEGER NOT NULL,
    tiers TEXT NOT NULL,
    h2d_gbps REAL,
    state TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_heartbeat REAL
);
CREATE TABLE IF NOT EXISTS cache (
    node_id TEXT NOT NULL,
    model TEXT NOT NULL,
    tier TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    verified INTEGER NOT NULL,
    last_used REAL NOT NULL,
    persistent INTEGER NOT NULL,
    PRIMARY KEY (node_id, model, tier)
);
CREATE INDEX IF NOT EXISTS cache_by_model ON cache (model);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    node_id TEXT NOT NULL,
    state TEXT NOT NULL,
    worker_url TEXT,
    gpu_ids TEXT NOT NULL,
    running_requests INTEGER NOT NULL DEFAULT 0,
    routed_since_heartbeat INTEGER NOT NULL DEFAULT 0,
    tokens_in_flight INTEGER,
    prefill_tps REAL,
    requested_at REAL NOT NULL,
    last_used REAL NOT NULL,
    load_tier TEXT,
    load_seconds REAL,
    placement TEXT
);
CREATE INDEX IF NOT EXISTS instances_by_model ON instances (model);
CREATE INDEX IF NOT EXISTS instances_by_node ON instances (node_id);
CREATE TABLE IF NOT EXISTS allocations (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    model TEXT,
    preferred_nodes TEXT NOT NULL,
    nodes TEXT NOT NULL,
    partition TEXT,
    time_limit_seconds REAL,
    submitted_at REAL NOT NULL,
    started_at REAL,
    walltime_end REAL,
    retire_at REAL,
    idle_since REAL,
    ended_at REAL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS allocation_intents (
    tag TEXT PRIMARY KEY,
    model TEXT,
    preferred_nodes TEXT NOT NULL,
    partition TEXT,
    time_limit_seconds REAL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cold_starts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    node_id TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    tier TEXT,
    load_seconds REAL,
    requested_at REAL NOT NULL,
    ready_at REAL,
    estimate_seconds REAL
);
CREATE TABLE IF NOT EXISTS demand (
    model TEXT PRIMARY KEY,
    since REAL NOT NULL,
    last REAL NOT NULL
);
INSERT INTO schema_version (version) VALUES (1);
INSERT INTO allocations VALUES('4242','running','tiny-llama','["n1"]','["n1"]','batch',3600.0,1700000001.0,1700000010.0,NULL,NULL,NULL,NULL,NULL);
INSERT INTO cache VALUES('n1','tiny-llama','nvme',123456789,1,1700000000.0,1);
INSERT INTO demand VALUES('tiny-llama',1700000030.0,1700000040.0);
INSERT INTO cold_starts VALUES(1,'tiny-llama','n1','inst-1','nvme',0.8,1700000012.0,1700000020.0,NULL);
INSERT INTO instances VALUES('inst-1','tiny-llama','n1','ready','http://n1:9100','[0]',0,0,NULL,NULL,1700000012.0,1700000020.0,'nvme',0.8,NULL);
INSERT INTO models VALUES('tiny-llama','{"name":"tiny-llama","source":"/shared/models/tiny-llama","size_bytes":123456789,"gpus":0,"max_model_len":null,"keep_alive_seconds":300.0,"min_instances":0,"max_instances":2,"slurm":{"partition":null,"account":null,"qos":null,"time":null},"deployed_at":1700000000.0}',123456789,1700000000.0);
INSERT INTO nodes VALUES('n1','http://n1:9000','4242',0,2,'{"dram":{"capacity_bytes":64000000000,"read_gbps":12.5,"scope":null},"nvme":{"capacity_bytes":1000000000000,"read_gbps":3.25,"scope":"persistent"},"sharedfs":{"capacity_bytes":null,"read_gbps":1.5,"scope":null}}',20.0,'up',1700000010.0,1700000020.0);
INSERT INTO nodes VALUES('n2','http://n2:9000','4243',1,0,'{"dram":null,"nvme":null,"sharedfs":{"capacity_bytes":null,"read_gbps":1.0,"scope":null}}',NULL,'up',1700000011.0,1700000011.0);
