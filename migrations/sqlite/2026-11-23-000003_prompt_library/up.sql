-- The prompt library (specialties; sub-specialties are specialties with a
-- parent; expert prompts and their immutable versions), generated ideas,
-- and single-use stream tickets for browser clients (EventSource, WebSocket).
CREATE TABLE specialties (
    id TEXT PRIMARY KEY NOT NULL,
    parent_id TEXT REFERENCES specialties(id),
    owner_id TEXT REFERENCES users(id) ON DELETE SET NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    published BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX specialties_parent ON specialties(parent_id);

CREATE TABLE expert_prompts (
    id TEXT PRIMARY KEY NOT NULL,
    sub_specialty_id TEXT NOT NULL REFERENCES specialties(id),
    owner_id TEXT REFERENCES users(id) ON DELETE SET NULL,
    published BOOLEAN NOT NULL DEFAULT FALSE,
    current_version INTEGER NOT NULL,
    title TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX expert_prompts_sub_specialty ON expert_prompts(sub_specialty_id);

CREATE TABLE expert_prompt_versions (
    prompt_id TEXT NOT NULL REFERENCES expert_prompts(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    title TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    template TEXT NOT NULL,
    variables_schema TEXT NOT NULL,
    expected_output TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    created_by TEXT REFERENCES users(id) ON DELETE SET NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (prompt_id, version)
);

CREATE TABLE ideas (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    execution_id TEXT NOT NULL,
    prompt TEXT,
    category TEXT,
    theme TEXT,
    creativity INTEGER NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    content TEXT NOT NULL,
    rating INTEGER CHECK (rating BETWEEN 1 AND 5),
    favorite BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL
);
CREATE INDEX ideas_user_created ON ideas(user_id, created_at);

CREATE TABLE stream_tickets (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE INDEX stream_tickets_expires ON stream_tickets(expires_at);

-- Built-in idea prompts (see crates/prompts/src/ideas.rs for the ids).
INSERT INTO specialties (id, parent_id, owner_id, name, description, published, created_at, updated_at) VALUES
    ('01930000-0000-7000-8000-000000000001', NULL, NULL, 'Creative ideas',
     'Built-in prompts behind /api/v1/ai/generate.', TRUE, 1763769600000, 1763769600000),
    ('01930000-0000-7000-8000-000000000002', '01930000-0000-7000-8000-000000000001', NULL, 'Idea generation',
     'One original idea from a free prompt, or from a category and a theme.', TRUE, 1763769600000, 1763769600000);

INSERT INTO expert_prompts (id, sub_specialty_id, owner_id, published, current_version, title, tags, created_at, updated_at) VALUES
    ('01930000-0000-7000-8000-000000000010', '01930000-0000-7000-8000-000000000002', NULL, TRUE, 1,
     'Idea from a free prompt', '["ideas"]', 1763769600000, 1763769600000),
    ('01930000-0000-7000-8000-000000000011', '01930000-0000-7000-8000-000000000002', NULL, TRUE, 1,
     'Idea from a category and a theme', '["ideas"]', 1763769600000, 1763769600000);

INSERT INTO expert_prompt_versions (prompt_id, version, title, description, template, variables_schema, expected_output, tags, created_by, created_at) VALUES
    ('01930000-0000-7000-8000-000000000010', 1, 'Idea from a free prompt',
     'Used by /api/v1/ai/generate when a prompt is given.',
     'You are Creative Muse, an assistant that invents original, concrete ideas.
Creativity level: {creativity}/10 (1 = practical and safe, 10 = bold and surprising).

Request: {prompt}

Answer with one idea: a short title on the first line, then two to four sentences that describe it.',
     '{"type":"object","required":["prompt"],"properties":{"prompt":{"type":"string","minLength":1,"maxLength":4000},"creativity":{"type":"integer","minimum":1,"maximum":10,"default":5}}}',
     'A title line, then a short description.', '["ideas"]', NULL, 1763769600000),
    ('01930000-0000-7000-8000-000000000011', 1, 'Idea from a category and a theme',
     'Used by /api/v1/ai/generate when a category is given.',
     'You are Creative Muse, an assistant that invents original, concrete ideas.
Creativity level: {creativity}/10 (1 = practical and safe, 10 = bold and surprising).

Invent one original idea in the category "{category}", on the theme "{theme}".

Answer with one idea: a short title on the first line, then two to four sentences that describe it.',
     '{"type":"object","required":["category"],"properties":{"category":{"type":"string","minLength":1,"maxLength":100},"theme":{"type":"string","maxLength":100,"default":"anything"},"creativity":{"type":"integer","minimum":1,"maximum":10,"default":5}}}',
     'A title line, then a short description.', '["ideas"]', NULL, 1763769600000);
