"""Evaluation (installed as `vlbridge.eval`): VQA scoring today; benchmark suites build on it."""
