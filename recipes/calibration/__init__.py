"""Data for the default calibration set (quantize.calibration): prompts, image captions, passages."""
