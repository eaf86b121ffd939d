"""Pathology foundation models: the architecture and checkpoint layout each vendor publishes.

The ``model_kwargs`` repeat each vendor's published timm recipe, so a downloaded file loads strictly; only the
checkpoint keys that differ from timm's are translated (see ``convert``). ``dynamic_img_size`` where the vendor
sets it: at other image sizes the position table is then resampled as the vendor's timm does (with antialias).
"""

from __future__ import annotations

from functools import partial

from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .convert import conch_to_timm, hf_dinov2_to_timm, hf_vit_to_timm, pathoduet_to_timm
from .registry import CLIP_MEAN, CLIP_STD, BackboneSpec, register_backbone
from .vit import AttentionalPool, HeadSpec

# SwiGLU ViTs as UNI2-h, Virchow2, H-optimus-0 and Prov-GigaPath build them with timm.
_SWIGLU = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}
# Vendors whose published recipe builds the model with dynamic_img_size (UNI, UNI2-h, Virchow2, CONCH).
_DYNAMIC = {"dynamic_img_size": True}
# CONCH's contrastive image embedding: width and attention heads of its attentional pooler (conch_ViT-B-16.json).
CONCH_EMBED_DIM = 512
CONCH_POOL_HEADS = 8


def conch_head(vit: VisionTransformer) -> None:
    """CONCH's image head: one learned query attends over every trunk token (class token included), then
    ``ln_contrast``; the 512-d result is ``encode_image(proj_contrast=False)``."""
    vit.attn_pool = AttentionalPool(CONCH_EMBED_DIM, vit.embed_dim, num_heads=CONCH_POOL_HEADS)
    vit.pool_include_prefix = True
    vit.head_hidden_size = CONCH_EMBED_DIM


UNI = register_backbone(
    BackboneSpec(
        name="uni",
        hub_repo="MahmoodLab/UNI",
        hub_file="pytorch_model.bin",
        timm_name="vit_large_patch16_224",
        family="pathology",
        image_size=224,
        model_kwargs={"init_values": 1e-5, **_DYNAMIC},
        weights_hint="pytorch_model.bin from the MahmoodLab/UNI Hugging Face repo",
        pool="token",
        license="cc-by-nc-nd-4.0",
        description="UNI (Mahmood Lab): DINOv2 ViT-L/16 trained on 100M tiles from 100k H&E and IHC slides.",
    )
)

UNI2_H = register_backbone(
    BackboneSpec(
        name="uni2_h",
        hub_repo="MahmoodLab/UNI2-h",
        hub_file="pytorch_model.bin",
        timm_name="vit_giant_patch14_224",
        family="pathology",
        image_size=224,
        model_kwargs={
            "patch_size": 14,
            "embed_dim": 1536,
            "depth": 24,
            "num_heads": 24,
            "mlp_ratio": 2.66667 * 2,
            "init_values": 1e-5,
            "reg_tokens": 8,
            "no_embed_class": True,
            **_SWIGLU,
            **_DYNAMIC,
        },
        weights_hint="pytorch_model.bin from the MahmoodLab/UNI2-h Hugging Face repo",
        pool="token",
        license="cc-by-nc-nd-4.0",
        description="UNI2-h (Mahmood Lab): ViT-H/14, SwiGLU, 8 registers; 200M+ tiles from 350k slides.",
    )
)

VIRCHOW2 = register_backbone(
    BackboneSpec(
        name="virchow2",
        hub_repo="paige-ai/Virchow2",
        timm_name="vit_huge_patch14_224",
        family="pathology",
        image_size=224,
        model_kwargs={"mlp_ratio": 5.3375, "init_values": 1e-5, "reg_tokens": 4, **_SWIGLU, **_DYNAMIC},
        weights_hint="pytorch_model.bin (or model.safetensors) from the paige-ai/Virchow2 Hugging Face repo",
        pool="token+avg",  # Paige's recommended tile embedding: class token ++ mean of patch tokens
        license="cc-by-nc-nd-4.0",
        description="Virchow2 (Paige): ViT-H/14, SwiGLU, 4 registers; 3.1M slides at mixed magnifications.",
    )
)

PHIKON = register_backbone(
    BackboneSpec(
        name="phikon",
        hub_repo="owkin/phikon",
        timm_name="vit_base_patch16_224",
        family="pathology",
        image_size=224,
        # HF ViTConfig.layer_norm_eps; timm's default 1e-6 would shift features slightly.
        model_kwargs={"norm_layer": partial(nn.LayerNorm, eps=1e-12)},
        key_map=hf_vit_to_timm,
        weights_hint="pytorch_model.bin (or model.safetensors) from the owkin/phikon Hugging Face repo",
        pool="token",  # last_hidden_state[:, 0], as Owkin's example extracts it
        license="other",
        license_name="owkin-non-commercial",
        license_link="https://github.com/owkin/HistoSSLscaling/blob/main/LICENSE.txt",
        description="Phikon (Owkin): iBOT ViT-B/16 trained on 43M TCGA tiles (HF ViTModel layout).",
    )
)

PHIKON_V2 = register_backbone(
    BackboneSpec(
        name="phikon_v2",
        hub_repo="owkin/phikon-v2",
        hub_file="model.safetensors",
        timm_name="vit_large_patch16_224",
        family="pathology",
        image_size=224,
        model_kwargs={"init_values": 1e-5},
        key_map=hf_dinov2_to_timm,
        weights_hint="model.safetensors from the owkin/phikon-v2 Hugging Face repo",
        pool="token",
        license="other",
        license_name="owkin-non-commercial",
        license_link="https://huggingface.co/owkin/phikon-v2/blob/main/LICENSE.pdf",
        description="Phikon-v2 (Owkin): DINOv2 ViT-L/16, 456M tiles from 58k slides (HF Dinov2Model layout).",
    )
)

H_OPTIMUS_0 = register_backbone(
    BackboneSpec(
        name="h_optimus_0",
        hub_repo="bioptimus/H-optimus-0",
        timm_name="vit_giant_patch14_reg4_dinov2",
        family="pathology",
        image_size=224,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        model_kwargs={"init_values": 1e-5},
        weights_hint="pytorch_model.bin or model.safetensors from the bioptimus/H-optimus-0 HF repo",
        pool="token",
        license="apache-2.0",
        description="H-optimus-0 (Bioptimus): DINOv2 ViT-G/14 with 4 registers, 500k+ H&E slides.",
    )
)

GIGAPATH = register_backbone(
    BackboneSpec(
        name="gigapath",
        hub_repo="prov-gigapath/prov-gigapath",
        hub_file="pytorch_model.bin",
        timm_name="vit_giant_patch14_dinov2",  # SwiGLU ViT-G, with GigaPath's 16 px patches
        family="pathology",
        image_size=224,
        model_kwargs={
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
            "init_values": 1e-5,
        },
        weights_hint="pytorch_model.bin (tile encoder) from the prov-gigapath/prov-gigapath HF repo",
        pool="token",
        license="apache-2.0",
        description="Prov-GigaPath tile encoder (Microsoft/Providence): DINOv2 ViT-G/16, 1.3B tiles.",
    )
)

CONCH = register_backbone(
    HeadSpec(
        name="conch",
        hub_repo="MahmoodLab/CONCH",
        hub_file="pytorch_model.bin",
        timm_name="vit_base_patch16_224",
        family="pathology",
        image_size=448,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        model_kwargs=_DYNAMIC,
        key_map=conch_to_timm,
        weights_hint="pytorch_model.bin from the MahmoodLab/CONCH Hugging Face repo (image tower is used)",
        head=conch_head,
        pool="default",  # the attentional pooler + ln_contrast, CONCH's published 512-d image embedding
        license="cc-by-nc-nd-4.0",
        description="CONCH (Mahmood Lab): CoCa vision-language model; ViT-B/16 image tower at 448 px, 512-d.",
    )
)

PATHODUET = register_backbone(
    BackboneSpec(
        name="pathoduet",
        timm_name="vit_base_patch16_224",
        family="pathology",
        image_size=224,
        mean=(0.0, 0.0, 0.0),  # PathoDuet feeds ToTensor() pixels in [0, 1], with no normalisation
        std=(1.0, 1.0, 1.0),
        # The pretext token rides in timm's register slot: [cls][pretext][patches], neither with a position.
        # global_pool='avg' as PathoDuet builds it: norm is Identity, fc_norm normalises the mean patch token.
        model_kwargs={"reg_tokens": 1, "global_pool": "avg"},
        key_map=pathoduet_to_timm,
        weights_hint="checkpoint_p2.pth (or checkpoint_HE.pth) from the openmedlab/PathoDuet release",
        pool="default",  # fc_norm(mean of the patch tokens), as PathoDuet's forward_head
        description="PathoDuet (OpenMedLab): MoCo v3 ViT-B/16 with a pretext token, TCGA H&E tiles.",
    )
)
