"""The QKD network around one satellite: stations, pass schedules, key pools, relay,
ETSI GS QKD 014 key delivery (docs/network.md)."""
