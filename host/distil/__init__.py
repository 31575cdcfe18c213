"""Key distillation: Alice and Bob as separate endpoints over an authenticated channel.

Stages (docs/distillation.md): time sync, sifting, decoy-state finite-key estimation,
error correction (LDPC, Cascade baseline), verification, privacy amplification.
"""
