"""Tensor-level building blocks: Hadamard rotations, the lattice codebook, 2-bit packing."""
