ALTER TABLE plans DROP COLUMN max_training_jobs;
DROP TABLE training_jobs;
DROP TABLE datasets;
