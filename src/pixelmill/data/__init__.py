"""Data: scan files, build datasets and data modules, write the built-in demo data."""
