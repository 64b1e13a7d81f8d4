"""Offline tools over a bundle: evaluation, metrics, benchmarks, tuning, batch prediction, edge bundles, manifests."""
