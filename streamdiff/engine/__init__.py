"""The multi-stream engine: per-stream state, a pure scheduler, batch assembly and the worker that owns the model."""
