"""Pipeline model-parallel training (docs/pipetrain.md): stages of a TVM training step, GPipe and 1F1B
schedules with micro-batches, data-parallel stage replicas, a partition/resource search, and runs on
this machine or on emulated devices over TVM RPC."""
