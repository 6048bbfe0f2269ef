"""Multi-device cooperative inference: a pipeline of heterogeneous devices (docs/pipeline.md)."""
