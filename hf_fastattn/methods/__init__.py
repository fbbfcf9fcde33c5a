"""One module per method: its HF attention function, mask builder, per-layer state and capability declaration."""
