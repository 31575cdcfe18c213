"""`qkdsat simulate`: stand-alone physics simulation of a pass into a pass directory."""
