"""The model lists of `bench/zoo.py`: every torchvision classifier, one small timm model per architecture family,
and transformers image classifiers built offline from small configs.

Each entry says how to build the model and at which input size to run it. Sizes are lowered where the model allows
it without changing its structure (a CNN takes any size; a ViT gets a smaller position table through its own
`img_size` / `image_size` argument); models that need their own size (window attention that must tile the grid,
MaxViT's partitions) keep it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional


@dataclass
class ZooModel:
    """One benchmark entry: `library` (torchvision / timm / hf), its `name`, the family it stands for, the model
    kwargs passed to the library, and `size` (crop; resize = size / 0.875) when the preprocessing is overridden
    (None: the library's own preprocessing)."""
    library: str
    name: str
    family: str = ""
    kwargs: Dict[str, Any] = field(default_factory=dict)
    size: Optional[int] = None


# ---------------------------------------------------------------------------------------------------- torchvision

TORCHVISION_SIZE = 160  # CNNs take any input; 160 keeps every stride-32 map at 5x5
TORCHVISION_OWN_SIZE = {"maxvit_t": 224,  # its 7x7 partitions must tile every stage: input a multiple of 224
                        "swin_t": 224, "swin_s": 224, "swin_b": 224,  # 7x7 (v1) / 8x8 (v2) windows tile the
                        "swin_v2_t": 256, "swin_v2_s": 256, "swin_v2_b": 256}  # grid unpadded at their own size
TORCHVISION_VIT_SIZE = {"vit_b_16": 160, "vit_b_32": 160, "vit_l_16": 160, "vit_l_32": 160, "vit_h_14": 168}


def torchvision_models() -> List[ZooModel]:
    """Every classifier of `torchvision.models.list_models(module=torchvision.models)`, random weights."""
    import torchvision

    entries = []
    for name in torchvision.models.list_models(module=torchvision.models):
        family = re.match(r"(wide_)?[a-z]+", name).group(0)
        if name in TORCHVISION_VIT_SIZE:  # the position table is made for image_size: ask for a smaller one
            size = TORCHVISION_VIT_SIZE[name]
            entries.append(ZooModel("torchvision", name, family, {"image_size": size}, size))
        else:
            entries.append(ZooModel("torchvision", name, family, {}, TORCHVISION_OWN_SIZE.get(name, TORCHVISION_SIZE)))
    return entries


# ----------------------------------------------------------------------------------------------------------- timm

# (family, model name, create_model kwargs, crop size or None for timm's own data config). One small model per
# architecture family; timm's own input size unless it is above 256 (then 224, through img_size for models with a
# position table, through the preprocessing for CNNs).
TIMM: List[tuple] = [
    # CNNs
    ("resnet", "resnet18", {}, None),
    ("resnetv2", "resnetv2_50", {}, None),
    ("resnet-d / SE", "seresnext26d_32x4d", {}, None),
    ("sknet", "skresnet18", {}, None),
    ("res2net", "res2net50_14w_8s", {}, None),
    ("resnest", "resnest14d", {}, None),
    ("regnet", "regnetx_002", {}, None),
    ("regnetz", "regnetz_b16", {}, None),
    ("efficientnet", "efficientnet_b0", {}, None),
    ("efficientnetv2", "efficientnetv2_rw_t", {}, None),
    ("mixnet", "mixnet_s", {}, None),
    ("mnasnet", "mnasnet_small", {}, None),
    ("mobilenetv2", "mobilenetv2_050", {}, None),
    ("mobilenetv3", "mobilenetv3_small_050", {}, None),
    ("mobilenetv4", "mobilenetv4_conv_small", {}, None),
    ("fbnetv3", "fbnetv3_b", {}, None),
    ("lcnet", "lcnet_050", {}, None),
    ("tinynet", "tinynet_e", {}, None),
    ("ghostnet", "ghostnet_100", {}, None),
    ("repghost", "repghostnet_050", {}, None),
    ("rexnet", "rexnet_100", {}, None),
    ("hardcorenas", "hardcorenas_a", {}, None),
    ("densenet", "densenet121", {}, None),
    ("dla", "dla34", {}, None),
    ("dpn", "dpn48b", {}, None),
    ("hrnet", "hrnet_w18_small", {}, None),
    ("inception", "inception_v3", {}, None),
    ("xception", "xception41", {}, None),
    ("vgg", "vgg11", {}, None),
    ("cspnet", "cspresnet50", {}, None),
    ("cs3 darknet", "cs3darknet_focus_s", {}, None),
    ("vovnet", "ese_vovnet19b_slim_dw", {}, None),
    ("selecsls", "selecsls42b", {}, None),
    ("nfnet", "nfnet_l0", {}, None),
    ("byobnet (gernet)", "gernet_s", {}, None),
    ("hgnetv2", "hgnetv2_b0", {}, None),
    ("convnext", "convnext_atto", {}, None),
    ("convnextv2", "convnextv2_atto", {}, None),
    ("inception_next", "inception_next_tiny", {}, None),
    ("rdnet", "rdnet_tiny", {}, None),
    ("starnet", "starnet_s050", {}, None),
    ("mobileone", "mobileone_s0", {}, None),
    ("repvit", "repvit_m0_9", {}, None),
    ("fasternet", "fasternet_t0", {}, None),
    ("ghostnetv3", "ghostnetv3_050", {}, None),
    # MLP-like and metaformers
    ("mlp-mixer", "mixer_s32_224", {}, None),
    ("resmlp", "resmlp_12_224", {}, None),
    ("gmlp", "gmlp_ti16_224", {}, None),
    ("sequencer (LSTM)", "sequencer2d_s", {}, None),
    ("poolformer", "poolformer_s12", {}, None),
    ("metaformer convformer", "convformer_s18", {}, None),
    ("metaformer caformer", "caformer_s18", {}, None),
    ("mambaout", "mambaout_femto", {}, None),
    # attention in CNNs
    ("lambda", "lambda_resnet26t", {}, None),
    ("botnet", "botnet26t_256", {}, None),
    ("halonet", "halonet26t", {}, None),
    # plain ViTs and their variants
    ("vit", "vit_tiny_patch16_224", {}, None),
    ("deit (distilled)", "deit_tiny_distilled_patch16_224", {}, None),
    ("deit3", "deit3_small_patch16_224", {}, None),
    ("vit + registers (dinov2)", "vit_small_patch14_reg4_dinov2", {"img_size": 224}, None),
    ("vit relpos", "vit_relpos_small_patch16_224", {}, None),
    ("eva02", "eva02_tiny_patch14_224", {}, None),
    ("beit", "beit_base_patch16_224", {"img_size": 112}, None),
    ("flexivit", "flexivit_small", {}, None),
    ("cait", "cait_xxs24_224", {}, None),
    ("convit", "convit_tiny", {}, None),
    ("xcit", "xcit_nano_12_p16_224", {}, None),
    ("tnt", "tnt_s_patch16_224", {}, None),
    ("pit", "pit_ti_224", {}, None),
    ("crossvit", "crossvit_tiny_240", {}, None),
    ("volo", "volo_d1_224", {}, None),
    ("levit", "levit_128s", {}, None),
    ("visformer", "visformer_tiny", {}, None),
    ("vitamin", "vitamin_small_224", {}, None),
    # hierarchical and hybrid transformers
    ("swin", "swin_tiny_patch4_window7_224", {}, None),
    ("swinv2 cr", "swinv2_cr_tiny_ns_224", {}, None),
    ("swinv2", "swinv2_tiny_window8_256", {}, None),
    ("nest", "nest_tiny", {}, None),
    ("twins", "twins_svt_small", {}, None),
    ("pvt_v2", "pvt_v2_b0", {}, None),
    ("coat", "coat_lite_tiny", {}, None),
    ("davit", "davit_tiny", {}, None),
    ("gcvit", "gcvit_xxtiny", {}, None),
    ("focalnet", "focalnet_tiny_srf", {}, None),
    ("hiera", "hiera_tiny_224", {}, None),
    ("tiny_vit", "tiny_vit_5m_224", {}, None),
    ("maxvit", "maxvit_nano_rw_256", {}, None),
    ("coatnet", "coatnet_nano_rw_224", {}, None),
    ("nextvit", "nextvit_small", {}, None),
    ("efficientformer", "efficientformer_l1", {}, None),
    ("efficientformerv2", "efficientformerv2_s0", {}, None),
    ("mobilevit", "mobilevit_xxs", {}, None),
    ("mobilevitv2", "mobilevitv2_050", {}, None),
    ("edgenext", "edgenext_xx_small", {}, None),
    ("efficientvit (mit)", "efficientvit_b0", {}, None),
    ("efficientvit (msra)", "efficientvit_m0", {}, None),
    ("fastvit", "fastvit_t8", {}, None),
    ("swiftformer", "swiftformer_xs", {}, None),
    ("shvit", "shvit_s1", {}, None),
]


def timm_models() -> List[ZooModel]:
    return [ZooModel("timm", name, family, dict(kwargs), size) for family, name, kwargs, size in TIMM]


# --------------------------------------------------------------------------------------------------- transformers

HF_SIZE = 128  # every config below is made for 128x128 inputs (stride-32 stages end at 4x4)
LABELS = 5  # a small random head


def _vit_like(**extra) -> Dict[str, Any]:
    return dict(image_size=HF_SIZE, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128, num_labels=LABELS, **extra)


STAGES = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1])


def _square(processor_cls: str, **extra) -> Callable:
    """An image processor that stretches to HF_SIZE x HF_SIZE (ViT's way)."""
    return lambda t: getattr(t, processor_cls)(size={"height": HF_SIZE, "width": HF_SIZE}, **extra)


def _edge_crop(processor_cls: str, **extra) -> Callable:
    """Shortest edge HF_SIZE * 8 / 7, then a HF_SIZE centre crop."""
    return lambda t: getattr(t, processor_cls)(size={"shortest_edge": HF_SIZE * 8 // 7},
                                               crop_size={"height": HF_SIZE, "width": HF_SIZE}, **extra)


def _convnext_processor(t):
    return t.ConvNextImageProcessor(size={"shortest_edge": HF_SIZE}, crop_pct=0.875)


# model type -> (model class, config class, config kwargs, processor factory)
HF: Dict[str, tuple] = {
    "vit": ("ViTForImageClassification", "ViTConfig", _vit_like(), _square("ViTImageProcessor")),
    "deit": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", _vit_like(), _edge_crop("DeiTImageProcessor")),
    "vit_msn": ("ViTMSNForImageClassification", "ViTMSNConfig", _vit_like(), _square("ViTImageProcessor")),
    "ijepa": ("IJepaForImageClassification", "IJepaConfig", _vit_like(), _square("ViTImageProcessor")),
    "beit": ("BeitForImageClassification", "BeitConfig",
             _vit_like(use_relative_position_bias=True, use_mean_pooling=True), _square("BeitImageProcessor")),
    "data2vec-vision": ("Data2VecVisionForImageClassification", "Data2VecVisionConfig",
                        _vit_like(use_relative_position_bias=True), _square("BeitImageProcessor")),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", _vit_like(), _edge_crop("BitImageProcessor")),
    "dinov2_with_registers": ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig",
                              _vit_like(num_register_tokens=4), _edge_crop("BitImageProcessor")),
    "clip": ("CLIPForImageClassification", "CLIPConfig",
             dict(vision_config=dict(image_size=HF_SIZE, patch_size=16, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128),
                  text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
                  projection_dim=32, num_labels=LABELS), _edge_crop("CLIPImageProcessor")),
    "siglip": ("SiglipForImageClassification", "SiglipConfig",
               dict(vision_config=dict(image_size=HF_SIZE, patch_size=16, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=128),
                    text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64), num_labels=LABELS), _square("SiglipImageProcessor")),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig", dict(**STAGES, num_labels=LABELS),
                 _convnext_processor),
    "convnextv2": ("ConvNextV2ForImageClassification", "ConvNextV2Config", dict(**STAGES, num_labels=LABELS),
                   _convnext_processor),
    "resnet": ("ResNetForImageClassification", "ResNetConfig",
               dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=LABELS),
               _convnext_processor),
    "regnet": ("RegNetForImageClassification", "RegNetConfig",
               dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], groups_width=8,
                    num_labels=LABELS), _convnext_processor),
    "bit": ("BitForImageClassification", "BitConfig",
            dict(embedding_size=32, hidden_sizes=[128, 256, 512, 1024], depths=[1, 1, 1, 1], num_labels=LABELS),
            _edge_crop("BitImageProcessor")),  # group norms of 32 groups, bottlenecks of width / 4
    "efficientnet": ("EfficientNetForImageClassification", "EfficientNetConfig",
                     dict(image_size=HF_SIZE, width_coefficient=0.5, depth_coefficient=0.5, hidden_dim=640,
                          num_labels=LABELS),
                     _square("EfficientNetImageProcessor")),
    "mobilenet_v1": ("MobileNetV1ForImageClassification", "MobileNetV1Config",
                     dict(image_size=HF_SIZE, depth_multiplier=0.25, num_labels=LABELS),
                     _edge_crop("MobileNetV1ImageProcessor")),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config",
                     dict(image_size=HF_SIZE, depth_multiplier=0.35, num_labels=LABELS),
                     _edge_crop("MobileNetV2ImageProcessor")),
    "swin": ("SwinForImageClassification", "SwinConfig",  # the last stage's 4x4 grid is one window
             dict(image_size=HF_SIZE, patch_size=4, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                  window_size=4, num_labels=LABELS), _square("ViTImageProcessor")),
    "swinv2": ("Swinv2ForImageClassification", "Swinv2Config",
               dict(image_size=HF_SIZE, patch_size=4, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                    window_size=4, num_labels=LABELS), _square("ViTImageProcessor")),
    "focalnet": ("FocalNetForImageClassification", "FocalNetConfig",
                 dict(image_size=HF_SIZE, patch_size=4, embed_dim=16, depths=[1, 1, 2, 1], num_labels=LABELS),
                 _edge_crop("BitImageProcessor")),
    "pvt": ("PvtForImageClassification", "PvtConfig",
            dict(image_size=HF_SIZE, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                 num_attention_heads=[1, 2, 2, 4], num_labels=LABELS), _square("PvtImageProcessor")),
    "pvt_v2": ("PvtV2ForImageClassification", "PvtV2Config",
               dict(image_size=HF_SIZE, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                    num_attention_heads=[1, 2, 2, 4], num_labels=LABELS), _square("PvtImageProcessor")),
    "segformer": ("SegformerForImageClassification", "SegformerConfig",
                  dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 4],
                       decoder_hidden_size=32, num_labels=LABELS), _square("SegformerImageProcessor")),
    "cvt": ("CvtForImageClassification", "CvtConfig",
            dict(embed_dim=[16, 32, 64], num_heads=[1, 2, 4], depth=[1, 2, 3], num_labels=LABELS),  # stage i needs
            _convnext_processor),  # depth > i (transformers indexes its drop-path rates by the stage)
    "levit": ("LevitForImageClassificationWithTeacher", "LevitConfig",
              dict(image_size=HF_SIZE, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                   key_dim=[8, 8, 8], num_labels=LABELS), _edge_crop("LevitImageProcessor")),
    "mobilevit": ("MobileViTForImageClassification", "MobileViTConfig",
                  dict(image_size=HF_SIZE, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                       num_labels=LABELS), _edge_crop("MobileViTImageProcessor")),
    "mobilevitv2": ("MobileViTV2ForImageClassification", "MobileViTV2Config",
                    dict(image_size=HF_SIZE, width_multiplier=0.5, num_labels=LABELS),
                    _edge_crop("MobileViTImageProcessor")),
    "poolformer": ("PoolFormerForImageClassification", "PoolFormerConfig",
                   dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=LABELS),
                   lambda t: t.PoolFormerImageProcessor(size={"shortest_edge": HF_SIZE}, crop_pct=0.9,
                                                        crop_size={"height": HF_SIZE, "width": HF_SIZE})),
    "swiftformer": ("SwiftFormerForImageClassification", "SwiftFormerConfig",
                    dict(image_size=HF_SIZE, depths=[1, 1, 1, 1], embed_dims=[16, 32, 64, 128], num_labels=LABELS),
                    _square("ViTImageProcessor")),
    "hiera": ("HieraForImageClassification", "HieraConfig",
              dict(image_size=[HF_SIZE, HF_SIZE], embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                   num_labels=LABELS), _edge_crop("BitImageProcessor")),
    "hgnet_v2": ("HGNetV2ForImageClassification", "HGNetV2Config", dict(num_labels=LABELS),
                 _edge_crop("BitImageProcessor")),
}


def hf_models() -> List[ZooModel]:
    return [ZooModel("hf", name, name, {}, None) for name in HF]


def build_hf_folder(model_type: str, folder: Path) -> None:
    """save_pretrained the small, randomly initialised model and its image processor into `folder` (offline)."""
    import torch
    import transformers

    model_cls, config_cls, config_kwargs, processor = HF[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**config_kwargs)
    getattr(transformers, model_cls)(config).eval().save_pretrained(folder)
    processor(transformers).save_pretrained(folder)


def all_models() -> List[ZooModel]:
    return torchvision_models() + timm_models() + hf_models()
