"""Number formats, calibration and the quantized-checkpoint writer."""
