"""Encoder families: from scratch and pretrained, one module per family."""
