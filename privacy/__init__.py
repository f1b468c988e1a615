"""Privacy mechanisms, accounting and attacks (differential privacy arrives in a later version)."""
