"""rloop-lightning: RLVR with iterative policy initialisation (RLoop) on PyTorch Lightning."""

__version__ = "0.1.0"
