"""LATTE: training-time cost models, sub-model allocation and federated training for a heterogeneous fleet."""
