-- Rubi Studio's specialties carry an icon (a URL shown next to the name).
ALTER TABLE specialties ADD COLUMN icon_url TEXT;
