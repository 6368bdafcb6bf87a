"""Real models built with xattn, kept runnable as part of the test suite."""
