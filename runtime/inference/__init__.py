"""Inference: sessions, precision choice, preprocessors, pipeline, fusion, audio engine, streaming, ensembles."""
