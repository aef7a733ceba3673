"""Command-line tools on trained checkpoints: predict, export, interpolate (WiSE-FT)."""
