"""fuse_tune: workloads, the trainer, studies and the ``fuse-tune`` CLI around fuse_optim."""
