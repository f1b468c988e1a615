"""Medical tasks (data, model, loss, metrics), the generic non-IID partitioner, seeding, and the scenario schema
every layer reads (the lowest layer: docs/architecture.md)."""
