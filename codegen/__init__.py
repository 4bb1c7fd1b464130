"""Backends: one lowering per target (torch reference loop, torch chunkwise, Triton)."""
