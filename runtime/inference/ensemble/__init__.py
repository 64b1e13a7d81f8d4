"""Ensembles: several bundles of the same labels, one prediction."""
