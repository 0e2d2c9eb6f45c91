"""TenSafe's SDK for the training service."""
