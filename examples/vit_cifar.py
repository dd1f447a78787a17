"""A small Vision Transformer for 32×32 images: timm's VisionTransformer with 4×4 patches.

timm's own code (fused qkv, cls token, position embedding, scaled_dot_product_attention),
so the CIFAR benchmark merges the same attention blocks as the zoo.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer


def vit_cifar(num_classes: int = 5, dim: int = 128, depth: int = 6, heads: int = 4) -> VisionTransformer:
    """Patch 4 on 32×32 (64 tokens + cls), ``depth`` blocks of ``heads`` heads, MLP ratio 2."""
    return VisionTransformer(img_size=32, patch_size=4, num_classes=num_classes, embed_dim=dim, depth=depth,
                             num_heads=heads, mlp_ratio=2.0)
