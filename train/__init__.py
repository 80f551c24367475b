"""FastLightGen training: the entry points at the top (`python -m train.<stage>`, thin loops over `fastlightgen`), with
the settings (config.py, ranges.py, cli.py); their machinery below: data/, models/, loop/, distributed/."""
