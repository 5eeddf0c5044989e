"""Layers used to build learnable gradient transforms."""

from compiledopt.nn.kronecker import KroneckerLinear, KroneckerLSTM, KroneckerRNN

__all__ = ["KroneckerLSTM", "KroneckerLinear", "KroneckerRNN"]
