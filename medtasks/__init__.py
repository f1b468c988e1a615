"""Medical tasks (data, model, loss, metrics) and the generic non-IID partitioner."""
