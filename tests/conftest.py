"""Tiny models built from configs and saved to a temp folder, loaded back through the scripts' own
from_pretrained code paths (the model hub is unreachable in tests)."""
import json
import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (pytest -n 2) each worker computes on one thread: two two-thread processes on two cores run
    many times slower than two one-thread ones. The scripts a test starts inherit OMP_NUM_THREADS."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


def tiny_unet2d(in_channels=3, num_classes=None, size=8):
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=size, in_channels=in_channels, out_channels=in_channels, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, num_class_embeds=num_classes)


def write_tiny_tokenizer(folder, max_length=8):
    """A CLIP tokenizer over single letters, written by hand: benchmark/scale.py's, which builds the paper-scale
    pipelines offline the same way. -> its vocabulary size."""
    from benchmark.scale import write_tokenizer
    return write_tokenizer(str(folder), max_length)


def tiny_text_encoder(vocab_size, max_length=8, hidden=16):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=max_length,
                                        projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1))


def tiny_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, sample_size=16)


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """{'vp_class': class-conditional DDPM UNet2DModel + scheduler, 'edm_uncond': unconditional EDM UNet2DModel
    with teacher.json, 'sd': an SD1.5-like pipeline folder, 'prompts': a prompts file}."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    tiny_unet2d(3, num_classes=10).save_pretrained(root / "vp_class" / "unet")
    DDPMScheduler().save_pretrained(root / "vp_class" / "scheduler")
    tiny_unet2d(1).save_pretrained(root / "edm_uncond")
    (root / "edm_uncond" / "teacher.json").write_text(json.dumps(
        {"formulation": "edm", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "noise_cond_scale": 1000.0}))
    sd = root / "sd"
    n_vocab = write_tiny_tokenizer(sd / "tokenizer")
    tiny_text_encoder(n_vocab).save_pretrained(sd / "text_encoder")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         norm_num_groups=8, attention_head_dim=4).save_pretrained(sd / "unet")
    tiny_vae().save_pretrained(sd / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(sd / "scheduler")
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "prompts.txt").write_text("a cat\na dog on a hill\nred sky\n")
    return {"vp_class": str(root / "vp_class"), "edm_uncond": str(root / "edm_uncond"), "sd": str(sd),
            "prompts": str(root / "prompts.txt")}


@pytest.fixture(scope="session")
def tiny_add_world(tmp_path_factory, tiny_teachers):
    """For add.py: a pixel class-conditional v-prediction teacher (zero-terminal-SNR schedule), an SDXL-like
    pipeline (two text encoders, text_time conditioning), a tiny random DINOv2, class folders and captions."""
    import numpy as np
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, Dinov2Config, Dinov2Model
    root = tmp_path_factory.mktemp("add")
    torch.manual_seed(0)
    tiny_unet2d(1, num_classes=3).save_pretrained(root / "pix" / "unet")
    DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True).save_pretrained(
        root / "pix" / "scheduler")
    xl = root / "sdxl"
    n = write_tiny_tokenizer(xl / "tokenizer")
    write_tiny_tokenizer(xl / "tokenizer_2")
    tiny_text_encoder(n).save_pretrained(xl / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, max_position_embeddings=8, projection_dim=12,
                                               bos_token_id=0, eos_token_id=1, pad_token_id=1)
                                ).save_pretrained(xl / "text_encoder_2")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
                         attention_head_dim=4, addition_embed_type="text_time", addition_time_embed_dim=4,
                         projection_class_embeddings_input_dim=12 + 6 * 4).save_pretrained(xl / "unet")
    tiny_vae().save_pretrained(xl / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(xl / "scheduler")
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                             patch_size=4, image_size=16)).save_pretrained(root / "dino")
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(root / "cls" / str(c))
        for j in range(2):
            Image.fromarray((rng.random((10, 10)) * 255).astype(np.uint8)).save(root / "cls" / str(c) / f"{j}.png")
    os.makedirs(root / "caps")
    for j, cap in enumerate(["a cat", "a dog", "red sky"]):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(root / "caps" / f"{j}.jpg")
        (root / "caps" / f"{j}.txt").write_text(cap)
    return {"pix": str(root / "pix"), "sdxl": str(xl), "sd": tiny_teachers["sd"], "dino": str(root / "dino"),
            "cls": str(root / "cls"), "caps": str(root / "caps")}
