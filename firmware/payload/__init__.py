# The payload controller's firmware logic. Nothing in this package imports `machine`:
# everything board-specific comes in through the board module (boards/<target>/board.py).
