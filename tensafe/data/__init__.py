"""Datasets, chat templates, tokenization and collation."""
