"""FastLightGen's custom ComfyUI socket types (everything else uses ComfyUI's native types)."""
from comfy_api.latest import io

# Carries a `fastlightgen.plan.PrunePlan`: which blocks of which model are kept.
PrunePlanType = io.Custom("FASTLIGHTGEN_PRUNE_PLAN")
# Carries a `fastlightgen.plan.ExpertPlans`: the plans of both experts of a two-expert model, and their boundary.
ExpertPlansType = io.Custom("FASTLIGHTGEN_EXPERT_PLANS")
