"""Tiny configs of the real diffusers model classes, shared by the library tests."""
from __future__ import annotations

import json

import torch
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

from fastlightgen.adapters import Conditioning


def tiny_wan(variant: str = "ti2v", layers: int = 6, seed: int = 0, heads: int = 2,
             head_dim: int = 32) -> WanTransformer3DModel:
    """Wan 2.1 T2V ('t2v'), Wan 2.1 I2V ('i2v') or Wan 2.2 TI2V-5B ('ti2v') at toy width."""
    torch.manual_seed(seed)
    channels = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48)}[variant]
    extra = {"image_dim": 24, "added_kv_proj_dim": heads * head_dim} if variant == "i2v" else {}
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                  in_channels=channels[0], out_channels=channels[1], text_dim=64,
                                  freq_dim=32, ffn_dim=96, num_layers=layers, rope_max_seq_len=64, **extra)
    # diffusers zero-inits nothing we depend on, but randomize the tables so blocks differ visibly
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def wan_inputs(model: WanTransformer3DModel, batch: int = 2, frames: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, frames, 8, 8, generator=g)
    cond = Conditioning(text=torch.randn(batch, 7, cfg.text_dim, generator=g))
    if cfg.image_dim:
        cond.image = torch.randn(batch, 5, cfg.image_dim, generator=g)
    return x, cond


def tiny_hunyuan(double: int = 2, single: int = 3, seed: int = 0) -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                           attention_head_dim=16, num_layers=double, num_single_layers=single,
                                           num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                           text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(4, 6, 6))
    return model.eval()


def hunyuan_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 3, 4, 4, generator=g)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[0, 4:] = False
    cond = Conditioning(text=torch.randn(batch, 6, 24, generator=g), text_mask=mask,
                        pooled=torch.randn(batch, 12, generator=g))
    return x, cond


def comfy_weight_files(model) -> dict[str, tuple[dict, dict]]:
    """`model` (diffusers) saved as ComfyUI distributes Wan: name -> (tensors, header metadata)."""
    from fastlightgen.wan_keys import diffusers_to_original

    sd = {k: v.detach() for k, v in diffusers_to_original(model.state_dict()).items()}
    linear = [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2]

    def fp8(scale_key: str | None) -> dict:
        out = {k: v.to(torch.bfloat16) for k, v in sd.items()}
        for k in linear:
            scale = sd[k].float().abs().amax() / 448 if scale_key else torch.tensor(1.0)
            out[k] = (sd[k].float() / scale).to(torch.float8_e4m3fn)
            if scale_key:
                out[k[: -len("weight")] + scale_key] = scale.reshape(())
        return out

    scaled = fp8("scale_weight")
    scaled["blocks.0.self_attn.q.scale_input"] = torch.tensor(1.0)
    mixed_layers = {k[: -len(".weight")]: {"format": "float8_e4m3fn"} for k in linear}
    return {
        "fp16": ({k: v.half() for k, v in sd.items()}, {}),
        "bf16": ({k: v.to(torch.bfloat16) for k, v in sd.items()}, {}),
        "fp8_e4m3fn": (fp8(None), {}),
        "fp8_scaled": ({**scaled, "scaled_fp8": torch.tensor([], dtype=torch.float8_e4m3fn)}, {}),
        "fp8_mixed": (fp8("weight_scale"), {"_quantization_metadata": json.dumps({"layers": mixed_layers})}),
        "all_in_one_prefixed": ({**{f"model.diffusion_model.{k}": v for k, v in sd.items()},
                                 "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4),
                                 "text_encoders.umt5xxl.shared.weight": torch.zeros(8, 4)}, {}),
    }


def tiny_tokenizer():
    """A T5-style (UMT5's) fast tokenizer trained here on a few sentences: pad 0, eos 1, unk 2, eos appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=64, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(["a red circle moves left", "a blue square jumps over the green line",
                             "the camera pans slowly across a quiet street at night"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def tiny_wan_folder(root, version: str = "2.1", layers: int = 2, seed: int = 0):
    """A Wan model folder exactly as Hugging Face distributes it (WanPipeline.save_pretrained: model_index.json,
    transformer/, vae/, text_encoder/, tokenizer/, scheduler/), tiny and random. "2.1": T2V, the 8x VAE;
    "2.2": TI2V-5B's layout, the 16x VAE (patchified, residual)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    z, vae_extra = (16, {}) if version == "2.1" else (48, {"is_residual": True, "patch_size": 2, "in_channels": 12,
                                                          "out_channels": 12, "scale_factor_spatial": 16})
    vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           latents_mean=torch.randn(z).tolist(), latents_std=(1 + torch.rand(z)).tolist(), **vae_extra)
    tokenizer = tiny_tokenizer()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=96, num_layers=1,
                                          num_heads=4, relative_attention_num_buckets=8))
    transformer = tiny_wan("t2v" if version == "2.1" else "ti2v", layers=layers, seed=seed)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.save_pretrained(str(root))
    return pipe
