"""Keys, signatures, KEM, TSSP packages, the audit chain and evidence (see docs/trust.md)."""
