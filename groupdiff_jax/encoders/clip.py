"""CLIP ViT-L/14 image tower: the projected image embedding (the paper's grouping encoder).

Weights: `model.safetensors` of the HuggingFace repository
`openai/clip-vit-large-patch14` (the whole CLIPModel: the text tower is
skipped), e.g.
  huggingface-cli download openai/clip-vit-large-patch14 model.safetensors --local-dir /weights/clip-l14
then `params = load_params('/weights/clip-l14')`.

Preprocessing (HuggingFace `CLIPImageProcessor` of that repository, applied
to the 256 px ADM crop as in the official feature extraction): resize the
short side to 224 (bicubic), centre crop 224, scale to [0, 1], normalise
with the CLIP mean/std. The embedding is `image_embeds`:
visual_projection(post_layernorm(CLS)), D = 768; L2-normalise it for
retrieval.
"""

import numpy as np

from groupdiff_jax import weights_io
from groupdiff_jax.encoders import dinov2, vit

CLIP_L14 = vit.ViTConfig(hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096, norm_eps=1e-5,
                         activation='quick_gelu', layer_scale=False, patch_bias=False, pre_norm=True,
                         projection_dim=768)
CONFIGS = {'clip_l14': CLIP_L14}
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
RESIZE, CROP = 224, 224
WHERE = ('Get it with: huggingface-cli download openai/clip-vit-large-patch14 model.safetensors '
         '--local-dir /weights/clip-l14.')


def preprocess(images, resize=RESIZE, crop=CROP):
  """uint8 [B, H, W, 3] (the ADM crops) -> float32 [B, crop, crop, 3], normalised with the CLIP statistics."""
  return (dinov2.resize_and_crop(images, resize, crop).astype(np.float32) / 255.0 - MEAN) / STD


def _pos_embed(w, config):
  w = w.reshape(1, *w.shape)  # [1 + g*g, D] -> [1, 1 + g*g, D]
  return dinov2._pos_embed(w, config)


_V = r'vision_model\.'
_L = _V + r'encoder\.layers\.(\d+)\.'
_NAMES = {'q': 'query', 'k': 'key', 'v': 'value', 'out': 'out'}
RULES = [
    (_V + r'embeddings\.class_embedding', 'cls_token', lambda w, c: w.reshape(1, 1, -1)),
    (_V + r'embeddings\.position_embedding\.weight', 'pos_embed', _pos_embed),
    (_V + r'embeddings\.patch_embedding\.weight', 'patch_embed/kernel', weights_io.CONV),
    (_V + r'pre_layrnorm\.weight', 'pre_norm/scale', weights_io.SAME),
    (_V + r'pre_layrnorm\.bias', 'pre_norm/bias', weights_io.SAME),
    (_L + r'layer_norm([12])\.weight', r'blocks_\1/norm\2/scale', weights_io.SAME),
    (_L + r'layer_norm([12])\.bias', r'blocks_\1/norm\2/bias', weights_io.SAME),
    (_L + r'self_attn\.q_proj\.weight', r'blocks_\1/query/kernel', weights_io.LINEAR),
    (_L + r'self_attn\.q_proj\.bias', r'blocks_\1/query/bias', weights_io.SAME),
    (_L + r'self_attn\.k_proj\.weight', r'blocks_\1/key/kernel', weights_io.LINEAR),
    (_L + r'self_attn\.k_proj\.bias', r'blocks_\1/key/bias', weights_io.SAME),
    (_L + r'self_attn\.v_proj\.weight', r'blocks_\1/value/kernel', weights_io.LINEAR),
    (_L + r'self_attn\.v_proj\.bias', r'blocks_\1/value/bias', weights_io.SAME),
    (_L + r'self_attn\.out_proj\.weight', r'blocks_\1/out/kernel', weights_io.LINEAR),
    (_L + r'self_attn\.out_proj\.bias', r'blocks_\1/out/bias', weights_io.SAME),
    (_L + r'mlp\.(fc[12])\.weight', r'blocks_\1/\2/kernel', weights_io.LINEAR),
    (_L + r'mlp\.(fc[12])\.bias', r'blocks_\1/\2/bias', weights_io.SAME),
    (_V + r'post_layernorm\.weight', 'norm/scale', weights_io.SAME),
    (_V + r'post_layernorm\.bias', 'norm/bias', weights_io.SAME),
    (r'visual_projection\.weight', 'projection/kernel', weights_io.LINEAR),
]
# The text tower, the logit scale and position-id buffers are not used.
IGNORE = (r'text_model\..*', r'text_projection\.weight', r'logit_scale', r'.*position_ids')


def convert(state, config=CLIP_L14, weights_path=''):
  """HuggingFace CLIPModel (or CLIPVisionModelWithProjection) state dict -> params of vit.ViT(config)."""
  return vit.convert(state, config, RULES, IGNORE, 'CLIP image tower', weights_path)


def load_params(path, config=CLIP_L14):
  """model.safetensors (or its directory) -> params; errors name the file and every key that does not fit."""
  return convert(vit.read_safetensors(path, 'CLIP', WHERE), config, vit.weights_file(path))
