"""A monthly CO2 forecaster whose future steps attend to the encoded past through CrossAttention."""
