"""A tiny random-weight SDXL pipeline, built from configs and saved with save_pretrained.

No network: the architecture follows diffusers' own `get_dummy_components` for SDXL (two tiny CLIP text
encoders, a two-level UNet with the "text_time" added conditioning, a two-level AutoencoderKL), and the
CLIP tokenizer is written by hand: a byte-level vocab.json (the 256 byte characters, the same with
`</w>`, then `<|startoftext|>` and `<|endoftext|>`) and a merges.txt holding only its header. The
folder it writes loads back through `StableDiffusionXLPipeline.from_pretrained(folder,
local_files_only=True)` — exactly the path bgwatch uses for a local model folder.

Geometry: unet.sample_size 64 and a VAE that downsamples by 2 make a native 128 x 128 image, so bgwatch's
bucket scale (sample_size * vae_scale_factor / 1024) is 1/8 and the 1216x832 bucket renders at 152x104.

Used by tests (the `tiny_sdxl` fixture below) and bench/bench_replace.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TEXT_HIDDEN = 32
VOCAB_SIZE = 514
BOS_ID = 512
EOS_ID = 513


def _byte_characters() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-character table, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    table = dict(zip(printable, codes, strict=True))
    return [chr(table[b]) for b in range(256)]


def write_tiny_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_characters()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = BOS_ID
    vocab["<|endoftext|>"] = EOS_ID
    assert len(vocab) == VOCAB_SIZE
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    # The slow-tokenizer files are enough for transformers to build the fast tokenizer from them.
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}), encoding="utf-8"
    )


def build_tiny_sdxl(folder: Path) -> Path:
    """Write a tiny SDXL pipeline folder (~7 MB, well under a second) and return its path."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN,  # six time ids + pooled text
        cross_attention_dim=2 * TEXT_HIDDEN,  # both text encoders' hidden states, concatenated
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )
    text_config = CLIPTextConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=VOCAB_SIZE,
        hidden_act="gelu",
        projection_dim=TEXT_HIDDEN,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    write_tiny_tokenizer(folder / "_tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "_tokenizer"))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(str(folder))
    import shutil

    shutil.rmtree(folder / "_tokenizer")
    return folder


@pytest.fixture(scope="session", name="tiny_sdxl")
def tiny_sdxl_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline folder shared by the whole session (import this fixture into a test module)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "tiny-sdxl")
