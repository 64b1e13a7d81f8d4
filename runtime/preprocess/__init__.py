"""Preprocessing per modality (image, audio, text) and voice normalisation: numpy/OpenCV, deterministic, shared by training and serving."""
