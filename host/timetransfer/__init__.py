"""Two-way quantum-secure time transfer (QSTT): simulation of a two-way pass, the joint
offset/range estimator and the `qkdsat timetransfer` command (docs/time-transfer.md)."""
