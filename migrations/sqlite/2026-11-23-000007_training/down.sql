DROP TABLE training_jobs;
DROP TABLE datasets;
