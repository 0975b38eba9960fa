"""Data: sample formats, the synthetic shapes dataset, batching."""
