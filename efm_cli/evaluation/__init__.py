"""Measuring a capacitor: the `efm eval` `report` and the colour-robust domain `classifier` it judges with."""
