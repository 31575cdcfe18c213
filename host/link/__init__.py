"""The ground link: framed serial transport to the payload controller."""
