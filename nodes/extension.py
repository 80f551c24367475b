"""The ComfyExtension that lists FastLightGen's nodes."""
from comfy_api.latest import ComfyExtension, io

from .guidance import TeacherMixSweep, WellGuidedTeacher
from .importance import BlockImportance
from .loader import LoadCheckpoint, register_model_folder
from .plan import ApplyPrunePlan, PrunePlanNode
from .preview import VideoGrid
from .sampling import FastLightGenSampler, FewStepSigmas
from .toy import ToyDatasetLatents, ToyDecode, ToyFirstFrameLatent, ToyTextEncode


class FastLightGenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_model_folder()  # before any schema lists the checkpoints
        return [
            BlockImportance, PrunePlanNode, ApplyPrunePlan, LoadCheckpoint, WellGuidedTeacher, TeacherMixSweep,
            VideoGrid, FewStepSigmas, FastLightGenSampler,
            ToyTextEncode, ToyFirstFrameLatent, ToyDatasetLatents, ToyDecode,
        ]
