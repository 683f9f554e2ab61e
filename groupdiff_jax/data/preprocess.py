"""Image preprocessing shared by the data jobs: the ADM centre crop.

`center_crop_arr` is the crop of ADM (guided-diffusion `image_datasets.py`),
used by DiT/SiT/REPA/GroupDiff for ImageNet 256: halve with a box filter
while the short side is at least twice the target, resize the short side to
the target with bicubic filtering, then take the central square.
"""

import numpy as np
from PIL import Image


def center_crop_arr(image, image_size):
  """uint8 [H, W, 3] (or a PIL image) -> uint8 [image_size, image_size, 3]."""
  pil_image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
  pil_image = pil_image.convert('RGB')
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  arr = np.asarray(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def to_unit_range(images):
  """uint8 images -> float32 in [-1, 1] (what the VAE expects)."""
  return np.asarray(images, np.float32) / 127.5 - 1.0
