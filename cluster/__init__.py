"""ndtrain.cluster: communicators (local, MPI, Ray), the per-rank worker loop, the coordinator, checkpoints."""
