"""The ComfyExtension that lists FastLightGen's nodes."""
from comfy_api.latest import ComfyExtension, io


class FastLightGenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []
