"""ComfyUI nodes of FastLightGen: thin V3-schema shells over the `fastlightgen` library.

Import this package only through the pack (ComfyUI loads it as a custom node); a top-level
`import nodes` means ComfyUI's own module.
"""
