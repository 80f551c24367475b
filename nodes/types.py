"""FastLightGen's custom ComfyUI socket types (everything else uses ComfyUI's native types)."""
from comfy_api.latest import io

# Carries a `fastlightgen.plan.PrunePlan`: which blocks of which model are kept.
PrunePlanType = io.Custom("FASTLIGHTGEN_PRUNE_PLAN")
