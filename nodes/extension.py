"""The ComfyExtension that lists FastLightGen's nodes."""
from comfy_api.latest import ComfyExtension, io

from .adapter import ApplyStudentAdapter, register_adapter_folder
from .expert_importance import ExpertBlockImportance
from .guidance import TeacherMixSweep, WellGuidedTeacher
from .importance import BlockImportance
from .loader import LoadCheckpoint, LoadExpertPair, LoadExpertPairFolder, register_model_folder
from .lora import StudentLoRA
from .plan import ApplyPrunePlan, LoadPrunePlan, PrunePlanNode, SavePrunePlan, register_plan_folder
from .preview import VideoGrid
from .sampling import FastLightGenSampler, FewStepSigmas
from .toy import ToyDatasetLatents, ToyDecode, ToyFirstFrameLatent, ToyTextEncode


class FastLightGenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_model_folder()  # before any schema lists the checkpoints or plans
        register_plan_folder()
        register_adapter_folder()
        return [
            BlockImportance, ExpertBlockImportance, PrunePlanNode, ApplyPrunePlan, LoadPrunePlan, SavePrunePlan,
            LoadCheckpoint, LoadExpertPair, LoadExpertPairFolder,
            WellGuidedTeacher, TeacherMixSweep, VideoGrid, FewStepSigmas, FastLightGenSampler, StudentLoRA,
            ApplyStudentAdapter,
            ToyTextEncode, ToyFirstFrameLatent, ToyDatasetLatents, ToyDecode,
        ]
