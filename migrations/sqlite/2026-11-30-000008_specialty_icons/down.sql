ALTER TABLE specialties DROP COLUMN icon_url;
