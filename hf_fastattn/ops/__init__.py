"""Triton kernels and their plain-PyTorch references, one folder per family. No transformers imports here."""
