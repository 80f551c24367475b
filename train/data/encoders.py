"""The encoders of `train.preprocess`, one per model family: videos -> latents, captions -> conditioning.

A family's class names the parts of the model folder it reads (`PARTS`, found by `train.models.loading.model_part`),
reads its codec's compression from the VAE's config.json (`strides`, no weight read) and, once built on a
device, encodes: `video` (B, 3, F, H, W) in [-1, 1] -> latents (B, C, f, h, w) on the CPU; `text` captions
-> the conditioning tensors a shard stores per row, on the CPU: `text` (N, L, D), and for HunyuanVideo also
`text_mask` (N, L) and `pooled` (N, P) (the keys train/data/batches.py reads). Captions are encoded one at a time:
a row's bits then depend on its caption alone, not on the rows that share its shard or on how many
processes split the dataset.
- "toy": the toy world's exact codec and text encoder;
- "wan": diffusers' AutoencoderKLWan (latents normalized by its latents_mean / latents_std) and UMT5 (512
  tokens, zero past the prompt, as WanPipeline feeds its transformer);
- "hunyuanvideo": as diffusers' HunyuanVideoPipeline encodes a prompt: the Llama text encoder reads the
  pipeline's prompt template around the caption, its hidden state after layer num_hidden_layers - 2 is
  kept past the template's system part (crop_start) with its attention mask, 256 tokens; CLIP's pooled
  output of the bare caption (77 tokens); AutoencoderKLHunyuanVideo latents times its scaling_factor (the
  pipeline divides by it before decoding).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

# files of which a tokenizer folder holds at least one (fast tokenizers, sentencepiece, CLIP's BPE)
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json", "tokenizer_config.json")


def default(cls: type, name: str):
    """A diffusers class's default for `name`: what a config.json that leaves it out means."""
    return inspect.signature(cls.__init__).parameters[name].default


def config_values(cls: type, folder: Path, keys: tuple[str, ...]) -> tuple:
    """`keys` of the diffusers model saved in `folder`, from its config.json alone (the class's defaults where it
    leaves them out)."""
    config = cls.load_config(str(folder))
    return tuple(config.get(k) or default(cls, k) for k in keys)


def check_parts(parts: dict[str, Path]) -> None:
    """Each folder holds the file that says what it is; raises FileNotFoundError naming the folder otherwise."""
    for part, folder in parts.items():
        if part.startswith("tokenizer"):
            if not any((folder / f).is_file() for f in TOKENIZER_FILES):
                raise FileNotFoundError(f"the {part} folder {folder} holds none of {', '.join(TOKENIZER_FILES)}; set "
                                        f"model.path to the downloaded model folder or preprocess.{part} to its "
                                        f"{part}/ folder")
        elif not (folder / "config.json").is_file():
            raise FileNotFoundError(f"the {part} folder {folder} holds no config.json: not a {part} as diffusers / "
                                    f"transformers save it")


class ToyEncoders:
    PARTS: tuple[str, ...] = ()
    codec = "the toy codec"

    def __init__(self, parts: dict[str, Path], device: torch.device):
        pass

    @staticmethod
    def strides(parts: dict[str, Path]) -> tuple[int, int]:
        from fastlightgen.toy.codec import PATCH
        return 1, PATCH  # every frame kept, PATCH x PATCH pixels per latent

    def video(self, videos: torch.Tensor) -> torch.Tensor:
        from fastlightgen.toy.codec import encode_video
        return encode_video(videos)

    def text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        from fastlightgen.toy.text import encode
        return {"text": torch.cat([encode([c]) for c in captions])}


class WanEncoders:
    PARTS = ("vae", "text_encoder", "tokenizer")
    codec = "the VAE"

    def __init__(self, parts: dict[str, Path], device: torch.device):
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.device = device
        self.vae = AutoencoderKLWan.from_pretrained(str(parts["vae"])).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(parts["tokenizer"]))
        self.encoder = UMT5EncoderModel.from_pretrained(str(parts["text_encoder"])).to(device).eval()

    @staticmethod
    def strides(parts: dict[str, Path]) -> tuple[int, int]:
        from diffusers import AutoencoderKLWan

        # Wan 2.1's config.json leaves them out: diffusers' defaults (4, 8) are its values
        return config_values(AutoencoderKLWan, parts["vae"], ("scale_factor_temporal", "scale_factor_spatial"))

    @torch.no_grad()
    def video(self, videos: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(videos.to(self.device)).latent_dist.mode()
        c = self.vae.config
        mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(c.latents_std).view(1, -1, 1, 1, 1).to(latents)
        return ((latents - mean) / std).cpu()

    def image_latents(self, videos: torch.Tensor) -> torch.Tensor:
        """An I2V model's image latents (fastlightgen.image_condition): the first frame followed by zero frames,
        encoded as the videos are, as WanImageToVideoPipeline encodes its image."""
        return self.video(torch.cat([videos[:, :, :1], torch.zeros_like(videos[:, :, 1:])], dim=2))

    @torch.no_grad()
    def text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        rows = []
        for caption in captions:
            tok = self.tokenizer([caption], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
            mask = tok.attention_mask.to(self.device)
            hidden = self.encoder(tok.input_ids.to(self.device), mask).last_hidden_state
            rows.append((hidden * mask.unsqueeze(-1)).cpu())
        return {"text": torch.cat(rows)}


class HunyuanVideoEncoders:
    PARTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    codec = "the VAE"
    TEXT_TOKENS = 256  # HunyuanVideoPipeline's max_sequence_length: tokens past the template's system part
    POOLED_TOKENS = 77  # CLIP's context
    LAYERS_SKIPPED = 2  # the pipeline's num_hidden_layers_to_skip: hidden state num_hidden_layers - 2

    def __init__(self, parts: dict[str, Path], device: torch.device):
        from diffusers import AutoencoderKLHunyuanVideo
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
        from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

        self.device = device
        # the pipeline's own template and crop_start (95: the system part's tokens, <|begin_of_text|> included,
        # with Llama 3's tokenizer): the model was trained on text encoded this way
        self.template = DEFAULT_PROMPT_TEMPLATE
        self.vae = AutoencoderKLHunyuanVideo.from_pretrained(str(parts["vae"])).to(device).eval()
        # tiled as HunyuanVideo's pipelines advise: a 720p, 129-frame video does not fit in one pass. Below 256
        # pixels and 16 frames nothing is tiled.
        self.vae.enable_tiling()
        # AutoTokenizer reads tokenizer_config.json's class (Llama 3's tokenizer is a PreTrainedTokenizerFast):
        # with transformers 5, the LlamaTokenizerFast class that model_index.json names rebuilds a
        # sentencepiece-style tokenizer that splits words otherwise than the saved tokenizer.json
        self.tokenizer = AutoTokenizer.from_pretrained(str(parts["tokenizer"]))
        self.llama = LlamaModel.from_pretrained(str(parts["text_encoder"])).to(device).eval()
        self.tokenizer_2 = AutoTokenizer.from_pretrained(str(parts["tokenizer_2"]))
        self.clip = CLIPTextModel.from_pretrained(str(parts["text_encoder_2"])).to(device).eval()

    @staticmethod
    def strides(parts: dict[str, Path]) -> tuple[int, int]:
        from diffusers import AutoencoderKLHunyuanVideo

        return config_values(AutoencoderKLHunyuanVideo, parts["vae"],
                             ("temporal_compression_ratio", "spatial_compression_ratio"))

    @torch.no_grad()
    def video(self, videos: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(videos.to(self.device)).latent_dist.mode()
        return (latents * self.vae.config.scaling_factor).cpu()

    @torch.no_grad()
    def text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        rows = [self.caption(c) for c in captions]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def caption(self, caption: str) -> dict[str, torch.Tensor]:
        crop = self.template["crop_start"]
        tok = self.tokenizer([self.template["template"].format(caption)], max_length=self.TEXT_TOKENS + crop,
                             padding="max_length", truncation=True, return_tensors="pt")
        hidden = self.llama(input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device),
                            output_hidden_states=True).hidden_states[-(self.LAYERS_SKIPPED + 1)]
        clip = self.tokenizer_2([caption], padding="max_length", max_length=self.POOLED_TOKENS, truncation=True,
                                return_tensors="pt")
        pooled = self.clip(clip.input_ids.to(self.device), output_hidden_states=False).pooler_output
        mask = tok.attention_mask[:, crop:].bool()
        return {"text": hidden[:, crop:].cpu(), "text_mask": mask, "pooled": pooled.cpu()}


ENCODERS = {"toy": ToyEncoders, "wan": WanEncoders, "hunyuanvideo": HunyuanVideoEncoders}
