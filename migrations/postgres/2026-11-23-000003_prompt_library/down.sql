DROP TABLE stream_tickets;
DROP TABLE ideas;
DROP TABLE expert_prompt_versions;
DROP TABLE expert_prompts;
DROP TABLE specialties;
