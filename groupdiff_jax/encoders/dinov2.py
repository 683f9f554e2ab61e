"""DINOv2 ViT-L/14 and ViT-B/14 image embeddings (the official GroupDiff grouping encoder: CLS token).

Weights: `model.safetensors` of the HuggingFace repositories
`facebook/dinov2-large` (ViT-L/14, the official default) or
`facebook/dinov2-base` (ViT-B/14), e.g.
  huggingface-cli download facebook/dinov2-large model.safetensors --local-dir /weights/dinov2-large
then `params = load_params('/weights/dinov2-large', DINOV2_L14)`.

Preprocessing (HuggingFace `BitImageProcessor` of these repositories, as
the official feature extraction applies it to the 256 px ADM crop): resize
the short side to 256 (bicubic), centre crop 224, scale to [0, 1],
normalise with the ImageNet mean/std. The embedding is `pooler_output`, the
final LayerNorm of the CLS token (D = 1024 / 768); the official code then
L2-normalises it. The 37x37 position grid of the checkpoint (518 px) is
resized to the 16x16 grid of 224 px at import, with PyTorch's bicubic
interpolation, as HuggingFace does at every call.
"""

import numpy as np
from PIL import Image

from groupdiff_jax import weights_io
from groupdiff_jax.encoders import vit

DINOV2_L14 = vit.ViTConfig(hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096)
DINOV2_B14 = vit.ViTConfig(hidden_size=768, depth=12, num_heads=12, mlp_dim=3072)
CONFIGS = {'dinov2_l14': DINOV2_L14, 'dinov2_b14': DINOV2_B14}
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
RESIZE, CROP = 256, 224
WHERE = ('Get it with: huggingface-cli download facebook/dinov2-large model.safetensors '
         '--local-dir /weights/dinov2-large (or facebook/dinov2-base).')


def resize_and_crop(images, resize, crop):
  """uint8 [B, H, W, 3] -> uint8 [B, crop, crop, 3]: short side to `resize` (PIL bicubic, as HuggingFace), centre crop."""
  out = []
  for image in np.asarray(images):
    h, w = image.shape[:2]
    if min(h, w) != resize:
      scale = resize / min(h, w)
      size = (resize, int(w * scale)) if h <= w else (int(h * scale), resize)
      image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))
    top, left = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
    out.append(image[top:top + crop, left:left + crop])
  return np.stack(out)


def preprocess(images, resize=RESIZE, crop=CROP):
  """uint8 [B, H, W, 3] (the ADM crops) -> float32 [B, crop, crop, 3], normalised with the ImageNet statistics."""
  return (resize_and_crop(images, resize, crop).astype(np.float32) / 255.0 - MEAN) / STD


def _pos_embed(w, config):
  """[1, 1 + g*g, D] at the checkpoint's grid -> [1, 1 + grid^2, D] (bicubic as PyTorch)."""
  cls, patches = w[:, :1], w[0, 1:]
  grid = int(round(np.sqrt(len(patches))))
  if grid == config.grid:
    return w
  patches = vit.resize_bicubic_torch(patches.reshape(grid, grid, -1), config.grid)
  return np.concatenate([cls, patches.reshape(1, config.grid**2, -1)], 1)


_P = r'(?:dinov2\.)?'
_L = _P + r'encoder\.layer\.(\d+)\.'
RULES = [
    (_P + r'embeddings\.cls_token', 'cls_token', weights_io.SAME),
    (_P + r'embeddings\.position_embeddings', 'pos_embed', _pos_embed),
    (_P + r'embeddings\.patch_embeddings\.projection\.weight', 'patch_embed/kernel', weights_io.CONV),
    (_P + r'embeddings\.patch_embeddings\.projection\.bias', 'patch_embed/bias', weights_io.SAME),
    (_L + r'norm([12])\.weight', r'blocks_\1/norm\2/scale', weights_io.SAME),
    (_L + r'norm([12])\.bias', r'blocks_\1/norm\2/bias', weights_io.SAME),
    (_L + r'attention\.attention\.(query|key|value)\.weight', r'blocks_\1/\2/kernel', weights_io.LINEAR),
    (_L + r'attention\.attention\.(query|key|value)\.bias', r'blocks_\1/\2/bias', weights_io.SAME),
    (_L + r'attention\.output\.dense\.weight', r'blocks_\1/out/kernel', weights_io.LINEAR),
    (_L + r'attention\.output\.dense\.bias', r'blocks_\1/out/bias', weights_io.SAME),
    (_L + r'layer_scale([12])\.lambda1', r'blocks_\1/layer_scale\2', weights_io.SAME),
    (_L + r'mlp\.(fc[12])\.weight', r'blocks_\1/\2/kernel', weights_io.LINEAR),
    (_L + r'mlp\.(fc[12])\.bias', r'blocks_\1/\2/bias', weights_io.SAME),
    (_P + r'layernorm\.weight', 'norm/scale', weights_io.SAME),
    (_P + r'layernorm\.bias', 'norm/bias', weights_io.SAME),
]
IGNORE = (_P + r'embeddings\.mask_token',)


def convert(state, config=DINOV2_L14, weights_path=''):
  """HuggingFace Dinov2Model state dict -> params of vit.ViT(config); `weights_path` is named in errors."""
  return vit.convert(state, config, RULES, IGNORE, 'DINOv2', weights_path)


def load_params(path, config=DINOV2_L14):
  """model.safetensors (or its directory) -> params; errors name every key that does not fit."""
  return convert(vit.read_safetensors(path, 'DINOv2', WHERE), config, vit.weights_file(path))
