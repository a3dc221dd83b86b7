-- The server schema as metadata.create_all made it before migrations existed (SQLite).
-- Frozen: the migration test builds a pre-Alembic database from it. Never edit.
CREATE TABLE agents (
	id INTEGER NOT NULL, 
	name VARCHAR(200) NOT NULL, 
	token_hash VARCHAR(64) NOT NULL, 
	allowed_task_types JSON NOT NULL, 
	created_at FLOAT NOT NULL, 
	last_seen FLOAT, 
	system_info JSON, 
	telemetry JSON, 
	telemetry_ts FLOAT, 
	PRIMARY KEY (id), 
	UNIQUE (token_hash)
);
CREATE TABLE console_sessions (
	id_hash VARCHAR(64) NOT NULL, 
	expires_at FLOAT NOT NULL, 
	PRIMARY KEY (id_hash)
);
CREATE TABLE log_lines (
	task_id INTEGER NOT NULL, 
	seq INTEGER NOT NULL, 
	ts FLOAT, 
	level VARCHAR(16), 
	stream VARCHAR(16), 
	message TEXT, 
	extra TEXT, 
	PRIMARY KEY (task_id, seq)
)
 WITHOUT ROWID;
CREATE TABLE models (
	id INTEGER NOT NULL, 
	name VARCHAR(500) NOT NULL, 
	hash VARCHAR(64) NOT NULL, 
	files JSON NOT NULL, 
	task_id INTEGER, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE projects (
	id INTEGER NOT NULL, 
	name VARCHAR(500) NOT NULL, 
	datasets JSON NOT NULL, 
	task_id INTEGER, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE task_metrics (
	task_id INTEGER NOT NULL, 
	seq INTEGER NOT NULL, 
	type VARCHAR(32), 
	epoch FLOAT, 
	metrics JSON, 
	PRIMARY KEY (task_id, seq)
);
CREATE TABLE tasks (
	id INTEGER NOT NULL, 
	agent_id INTEGER NOT NULL, 
	type VARCHAR(32) NOT NULL, 
	image VARCHAR(500), 
	command JSON, 
	config JSON NOT NULL, 
	project_id INTEGER, 
	model_id INTEGER, 
	resources JSON NOT NULL, 
	timeout_s FLOAT, 
	state VARCHAR(16) NOT NULL, 
	progress JSON, 
	exit_code INTEGER, 
	error TEXT, 
	stop_requested BOOLEAN NOT NULL, 
	lease_until FLOAT, 
	timeline JSON NOT NULL, 
	results JSON NOT NULL, 
	log_acked INTEGER NOT NULL, 
	created_at FLOAT NOT NULL, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE telemetry (
	id INTEGER NOT NULL, 
	agent_id INTEGER NOT NULL, 
	ts FLOAT NOT NULL, 
	sample JSON NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_tasks_agent_id ON tasks (agent_id);
CREATE INDEX ix_tasks_state ON tasks (state);
CREATE INDEX ix_telemetry_agent_id ON telemetry (agent_id);
