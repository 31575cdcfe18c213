"""`qkdsat mission`: an emulated pass end to end (docs/mission.md)."""
