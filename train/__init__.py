"""FastLightGen training entry points: `python -m train.<stage>`; thin loops over `fastlightgen`."""
