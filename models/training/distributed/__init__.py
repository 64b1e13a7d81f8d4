"""Training in several processes (torchrun / DistributedDataParallel): launch, sharding, batch-independent layers."""
