"""Tiny configs of the real diffusers model classes, shared by the library tests, and tiny random model folders
in the layouts Hugging Face distributes (Wan, HunyuanVideo) with tokenizers trained here (no download)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

from fastlightgen.adapters import Conditioning


def tiny_wan(variant: str = "ti2v", layers: int = 6, seed: int = 0, heads: int = 2,
             head_dim: int = 32) -> WanTransformer3DModel:
    """Wan 2.1 T2V ('t2v'), Wan 2.1 I2V ('i2v'), Wan 2.2 TI2V-5B ('ti2v') or an expert of Wan 2.2 I2V-A14B
    ('i2v-a14b': I2V's 36 channels without CLIP image tokens) at toy width."""
    torch.manual_seed(seed)
    channels = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48), "i2v-a14b": (36, 16)}[variant]
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
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    encoders = _tiny_wan_encoders(version)
    transformer = tiny_wan("t2v" if version == "2.1" else "ti2v", layers=layers, seed=seed)
    pipe = WanPipeline(**encoders, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.save_pretrained(str(root))
    return pipe


def _tiny_wan_encoders(version: str) -> dict:
    """The VAE ("2.1": 8x; "2.2": TI2V-5B's 16x), tokenizer and text encoder of a tiny Wan pipeline, from the global
    seed."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    z, vae_extra = (16, {}) if version == "2.1" else (48, {"is_residual": True, "patch_size": 2, "in_channels": 12,
                                                          "out_channels": 12, "scale_factor_spatial": 16})
    vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           latents_mean=torch.randn(z).tolist(), latents_std=(1 + torch.rand(z)).tolist(), **vae_extra)
    tokenizer = tiny_tokenizer()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=96, num_layers=1,
                                          num_heads=4, relative_attention_num_buckets=8))
    return {"vae": vae, "tokenizer": tokenizer, "text_encoder": encoder}


def tiny_wan_a14b_folder(root, variant: str = "t2v", layers: int = 2, seed: int = 0, comfy: bool = False):
    """A Wan 2.2 A14B folder as Hugging Face distributes it (Wan-AI/Wan2.2-T2V-A14B-Diffusers' layout: the pipeline's
    save_pretrained with the high-noise expert in transformer/, the low-noise one in transformer_2/, boundary_ratio
    in model_index.json: 0.875 for "t2v" (WanPipeline), 0.9 for "i2v" (WanImageToVideoPipeline, 36 input channels,
    no image encoder)), tiny and random; the experts differ (seeds `seed` and `seed` + 1). `comfy`: experts of the
    shapes ComfyUI detects (`tiny_a14b_expert`: heads of 128, UMT5's text width), for the pack's loaders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline

    from fastlightgen.experts import I2V_BOUNDARY, T2V_BOUNDARY

    torch.manual_seed(seed)
    kind = "t2v" if variant == "t2v" else "i2v-a14b"
    pipeline, boundary = (WanPipeline, T2V_BOUNDARY) if variant == "t2v" else (WanImageToVideoPipeline, I2V_BOUNDARY)
    encoders = _tiny_wan_encoders("2.1")
    high, low = ((tiny_a14b_expert(s, layers, variant) for s in (seed, seed + 1)) if comfy else
                 (tiny_wan(kind, layers=layers, seed=s) for s in (seed, seed + 1)))
    pipe = pipeline(**encoders, transformer=high, transformer_2=low,
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), boundary_ratio=boundary)
    pipe.save_pretrained(str(root))
    return pipe


# Llama 3's split of text into words (its tokenizer.json's pre-tokenizer), applied before the byte-level BPE
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
TINY_CAPTIONS = ["a red circle moves left", "a blue square jumps over the green line",
                 "the camera pans slowly across a quiet street at night"]


def tiny_llama_tokenizer():
    """A Llama 3-style tokenizer (byte-level BPE, <|begin_of_text|> prepended, header and eot tokens) trained here on
    HunyuanVideo's prompt template, as the real one is saved: a PreTrainedTokenizerFast (tokenizer.json). Its words
    are whole tokens, so the template's system part is 95 tokens as with the real tokenizer (the pipeline's
    crop_start)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([DEFAULT_PROMPT_TEMPLATE["template"].format(c) for c in TINY_CAPTIONS], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|end_of_text|>", padding_side="right")


def tiny_clip_tokenizer():
    """CLIP's tokenizer class (lower-cased byte-level BPE, </w> word ends, start and end tokens) over a vocabulary
    trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    empty = CLIPTokenizer()  # the class's own normalizer and pre-tokenizer, to train a vocabulary through
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer, tok.pre_tokenizer = empty.backend_tokenizer.normalizer, empty.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CAPTIONS, trainer)
    model = json.loads(tok.to_str())["model"]
    return CLIPTokenizer(vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                       for m in model["merges"]])


def tiny_hunyuan_folder(root, layers: tuple[int, int] = (2, 2), seed: int = 0):
    """A HunyuanVideo model folder as Hugging Face distributes it (HunyuanVideoPipeline.save_pretrained:
    model_index.json, transformer/, vae/, text_encoder/ (LlamaModel), tokenizer/, text_encoder_2/ (CLIPTextModel),
    tokenizer_2/, scheduler/), tiny and random: the Llama has 3 layers (the pipeline reads the output of the
    first: num_hidden_layers - 2), the transformer is guidance-distilled (guidance_embeds) like the public T2V."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_llama_tokenizer(), tiny_clip_tokenizer()
    llama = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer_2), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=16, pad_token_id=tokenizer_2.pad_token_id,
                                        bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id))
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4)
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=16, num_layers=layers[0],
                                                 num_single_layers=layers[1], num_refiner_layers=1, patch_size=2,
                                                 patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
                                                 rope_axes_dim=(4, 6, 6))
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip,
                                tokenizer_2=tokenizer_2)
    pipe.save_pretrained(str(root))
    # as the public download names its Llama 3 tokenizer (saving it here writes TokenizersBackend in both places)
    for path, key, value in ((Path(root) / "model_index.json", "tokenizer", ["transformers", "LlamaTokenizerFast"]),
                             (Path(root) / "tokenizer" / "tokenizer_config.json", "tokenizer_class",
                              "PreTrainedTokenizerFast")):
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}, indent=2))
    return pipe


def tiny_a14b_expert(seed: int, layers: int = 4, variant: str = "t2v") -> WanTransformer3DModel:
    """One expert of Wan 2.2 T2V-A14B as ComfyUI detects it (a Wan 2.1 T2V: 16 latent channels, UMT5's 4096-wide
    text, heads of 128) at the toy teacher's width and `layers` blocks, random; `variant` "i2v": an expert of
    I2V-A14B, the same with 36 input channels (latents + mask + image latents, fastlightgen.image_condition)."""
    from fastlightgen.toy.teacher import ToyTeacherShape

    torch.manual_seed(seed)
    in_channels = {"t2v": 16, "i2v": 36}[variant]
    config = {**ToyTeacherShape(num_layers=layers).diffusers_config(), "in_channels": in_channels, "out_channels": 16}
    return WanTransformer3DModel(**config).eval()


def save_a14b_pair(folder, kept: dict[str, list[int]] | None = None, boundary: float = 0.875, layers: int = 4,
                   prefix: str = "student", dtype=None, variant: str = "t2v") -> dict[str, Path]:
    """Two different random experts (seeds 0, 1) of `variant` (`tiny_a14b_expert`) in the files a two-expert
    export writes: `prefix`_high/_low.safetensors, FastLightGen checkpoints with the expert, the boundary, and
    each expert's kept blocks (physically pruned, renumbered); `kept` None keeps every block. {expert: path}."""
    from fastlightgen.adapters import adapt
    from fastlightgen.checkpoint import CheckpointMeta, save_checkpoint

    paths = {}
    for seed, expert in enumerate(("high", "low")):
        blocks = (kept or {}).get(expert, list(range(layers)))
        model = adapt(tiny_a14b_expert(seed, layers, variant)).pruned_model(blocks)
        meta = CheckpointMeta(layers, blocks, expert=expert, boundary=boundary)
        paths[expert] = save_checkpoint(Path(folder) / f"{prefix}_{expert}.safetensors", model, meta, dtype)
    return paths


def save_a14b_teacher_files(folder, layers: int = 4, fmt: str = "fp8_scaled", variant: str = "t2v") -> dict[str, Path]:
    """The two experts (seeds 0, 1) of `variant` as ComfyUI distributes Wan 2.2 A14B: no FastLightGen metadata,
    the expert in the name (toy_<variant>_high_noise_14B_<fmt>.safetensors), `fmt` one of
    `comfy_weight_files`'. {expert: path}."""
    from safetensors.torch import save_file

    paths = {}
    for seed, expert in enumerate(("high", "low")):
        tensors, metadata = comfy_weight_files(tiny_a14b_expert(seed, layers, variant))[fmt]
        paths[expert] = Path(folder) / f"toy_{variant}_{expert}_noise_14B_{fmt}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(paths[expert]), metadata=metadata or None)
    return paths


def save_random_wan21_vae(path: Path) -> None:
    """comfy's Wan 2.1 VAE at width 8 (sd.py reads the width from `decoder.head.0.gamma`), random, its convolutions
    initialised as torch does (ComfyUI's ops leave them empty); needs ComfyUI importable."""
    import comfy.ldm.wan.vae
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vae = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True])
    for module in vae.modules():
        for kind in (torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.Linear):
            if isinstance(module, kind):
                kind.reset_parameters(module)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
