"""Keys, signatures, KEM, TSSP packages, the audit chain and evidence (see PACKAGING.md)."""
