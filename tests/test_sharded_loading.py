"""Sharded model loading under ZeRO-3 (train/models/units.py `partitioned_model`), 2 processes on gloo (CPU).

Each rank builds the models under deepspeed.zero.Init and reads only its partitions from the files. Checked:
the partitions gather to exactly the whole models the plain path loads (teacher from a ComfyUI fp8_scaled file
in the original layout and from a diffusers folder, the pruned student, the buffers), and a rank's peak resident
memory while Stage III builds its models stays far below one whole fp32 teacher, which the path that loads
whole models first (dist.sharded_load=false) exceeds.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_train import REPO, subprocess_env
from test_train_distributed import free_port
from tiny_models import comfy_weight_files, tiny_wan

pytest.importorskip("deepspeed", reason="sharded loading is DeepSpeed's (pip install -e .[train])")

ZERO3 = ["dist.deepspeed=true", "dist.cpu_adam=false", "dist.param_persistence_threshold=0", "dist.world_size=2"]

GATHER_WORKER = """
import json, os, sys
import torch
import deepspeed
from fastlightgen.adapters import adapt
from train.config import load_config
from train.distributed.processes import init_dist
from train.models.loading import load_pruned, load_start, load_teacher

result = {}
for teacher in sys.argv[2:]:
    cfg = load_config(None, [f"model.teacher={teacher}", *json.loads(sys.argv[1])])
    init_dist(cfg)
    whole, part = load_teacher(cfg), load_start(cfg, None)
    kept = [0, 2, 3]
    pairs = [(whole, part), (adapt(whole).pruned_model(kept), load_pruned(cfg, part, None, kept))]
    same, sizes = True, True
    for reference, model in pairs:
        params = dict(model.named_parameters())
        # no rank holds more of a parameter than its share: ceil(numel / 2) elements
        sizes &= all(p.ds_tensor.numel() == -(-p.ds_numel // 2) and p.numel() == 0 for p in params.values())
        for name, p in reference.named_parameters():
            with deepspeed.zero.GatheredParameters([params[name]]):
                same &= torch.equal(params[name].detach(), p.detach())
        same &= all(torch.equal(b, dict(model.named_buffers())[k]) for k, b in reference.named_buffers())
    result[teacher] = {"same": same, "sizes": sizes}
if os.environ["RANK"] == "0":
    print("RESULT " + json.dumps(result))
# both ranks leave the group together: a rank exiting while gloo's threads still serve the other aborts
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""

RSS_WORKER = """
import json, os, sys
from pathlib import Path
import torch.distributed as tdist
from diffusers import WanTransformer3DModel  # imported before the measurement: its code is not the models
from train import stage3

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

record, load_start = {}, stage3.load_start

def measured_load_start(*args):  # the process group is up: what follows is the models
    record.setdefault("before", status("VmRSS"))
    return load_start(*args)

def stop(*args, **kwargs):  # the models are built, no engine yet: their peak, then the end
    record["growth"] = status("VmHWM") - record["before"]
    Path(os.environ["OUT"], f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))
    tdist.barrier()
    os._exit(0)

stage3.load_start, stage3.make_trainable = measured_load_start, stop
stage3.main(sys.argv[1:])
"""


def torchrun_script(script: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    env = {**subprocess_env(), "DS_ACCELERATOR": "cpu", **env}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_partitions_gather_to_the_whole_models_of_every_teacher_layout(tmp_path):
    model = tiny_wan("ti2v", layers=4, heads=1, head_dim=128)  # a raw original-layout file implies head_dim 128
    comfy = tmp_path / "wan_fp8_scaled.safetensors"
    save_file(comfy_weight_files(model)["fp8_scaled"][0], str(comfy))  # original layout, fp8 + scales
    folder = tmp_path / "transformer"
    model.save_pretrained(str(folder))
    worker = tmp_path / "worker.py"
    worker.write_text(GATHER_WORKER)
    proc = torchrun_script(worker, [json.dumps(ZERO3), str(comfy), str(folder)])
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert result == {str(comfy): {"same": True, "sizes": True}, str(folder): {"same": True, "sizes": True}}


def test_a_rank_building_stage3_never_holds_a_whole_fp32_teacher(tmp_path):
    """55 M parameters stored in bf16 (as released weights are) and trained in bf16: one whole fp32 teacher is
    220 MB. Sharded, a rank holds half of the teacher and of the student in bf16 (91 MB; measured ~110 MB);
    loaded whole, every rank first holds the fp32 teacher and student and the file's pages (measured ~540 MB)."""
    from diffusers import WanTransformer3DModel

    from fastlightgen.adapters import adapt
    from fastlightgen.plan import PrunePlan

    torch.manual_seed(0)
    teacher = WanTransformer3DModel(num_layers=12, num_attention_heads=4, attention_head_dim=128, ffn_dim=2048,
                                    in_channels=48, out_channels=48, text_dim=4096, patch_size=(1, 2, 2))
    folder, plan = tmp_path / "teacher", tmp_path / "plan.json"
    teacher.to(torch.bfloat16).save_pretrained(str(folder))
    PrunePlan.from_blocks(adapt(teacher).fingerprint(), [4, 5, 6, 7]).save(plan)
    full_fp32 = 4 * sum(p.numel() for p in teacher.parameters())
    worker = tmp_path / "worker.py"
    worker.write_text(RSS_WORKER)

    def growth(sharded: bool) -> list[int]:
        out = tmp_path / f"sharded_{sharded}"
        out.mkdir()
        settings = [*ZERO3, "dist.bf16=true", f"dist.sharded_load={str(sharded).lower()}", f"model.teacher={folder}",
                    f"stage3.plan={plan}", "stage3.init=teacher", f"run.run_dir={out / 'run'}"]
        # glibc's heap otherwise keeps a varying share of freed tensors resident (its mmap threshold adapts to
        # the sizes freed): a fixed threshold gives every large tensor back when freed, so the peak is what is held
        torchrun_script(worker, [a for s in settings for a in ("--set", s)], OUT=str(out),
                        MALLOC_MMAP_THRESHOLD_="65536")
        return [json.loads((out / f"rank{r}.json").read_text())["growth"] for r in range(2)]

    sharded, whole = growth(True), growth(False)
    assert all(g < 0.75 * full_fp32 for g in sharded), (sharded, full_fp32)
    assert all(g > full_fp32 for g in whole), (whole, full_fp32)  # the bound tells the two paths apart
