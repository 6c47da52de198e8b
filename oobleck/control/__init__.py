"""The control plane: a gRPC master per job, an agent per node, and the worker's client side."""
