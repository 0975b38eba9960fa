"""Evaluation (installed as `vlbridge.eval`).

- `vlbridge eval`: task YAMLs (`tasks/`) grouped into suites (`suites/`), data loaders (`loaders/`), official
  metrics (`metrics/`), one loop (`runner.py`) over a checkpoint or an OpenAI-compatible endpoint
  (`backends/`), reports (`report.py`) and run comparisons (`compare.py`).
- `vqa.py`, `after_training.py`: the held-out accuracy `vlbridge train` reports;
  `bench.py` / `efficiency.py`: `vlbridge bench`.
"""
