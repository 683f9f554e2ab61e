"""Images from tensorflow-datasets for the data jobs, with one clear message when the data are missing.

ImageNet cannot be downloaded automatically: TFDS `imagenet2012` must be
prepared once from the two archives (see PREPARE_STEPS). Rows are served in
the split's fixed order (no shuffling), so row i is the same image in every
job and every run: the latent store, the embeddings and the neighbour lists
share it.
"""

import numpy as np

from groupdiff_jax import errors

from groupdiff_jax.data import preprocess

PREPARE_STEPS = """TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}. To prepare it:
  1. Register at https://image-net.org/download-images and download ILSVRC2012_img_train.tar and
     ILSVRC2012_img_val.tar (about 150 GB).
  2. Put both files in one directory, the manual dir, e.g. ~/tensorflow_datasets/downloads/manual.
  3. Run this job again with --manual_dir=<that directory> (and the same --data_dir): it prepares the
     dataset once (hours; about 150 GB more in data_dir), then continues.
     Or prepare it alone: tfds build imagenet2012 --manual_dir=<dir> --data_dir=<data_dir>.
TFDS said: {error}"""


class DatasetNotReady(errors.UserError, RuntimeError):
  """The TFDS dataset is missing or not prepared; the message lists the steps."""


def open_split(name, split, data_dir=None, manual_dir=None):
  """(builder, number of rows) of a prepared split; prepares it from manual_dir when given.

  Raises:
    DatasetNotReady: missing archives or data, with the steps to prepare them.
  """
  import tensorflow as tf
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir)
  try:
    dataset = builder.as_dataset(split=split, shuffle_files=False)
  except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as not_prepared:
    if not manual_dir:
      raise DatasetNotReady(PREPARE_STEPS.format(name=name, data_dir=data_dir, error=not_prepared)) from None
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except AssertionError as e:  # missing/empty manual dir or archives
      raise DatasetNotReady(PREPARE_STEPS.format(name=name, data_dir=data_dir, error=e)) from None
    dataset = builder.as_dataset(split=split, shuffle_files=False)
  count = int(dataset.cardinality())
  if count < 0:
    count = builder.info.splits[split].num_examples
  return builder, count


def cropped_batches(builder, split, start, end, image_size, batch_size, flip=False):
  """Rows [start, end) of the split: numpy batches (uint8 [b, S, S, 3] ADM crops, int32 labels [b]).

  Decoding and cropping run in parallel in tf.data (PIL inside
  tf.numpy_function); the order is the split's.
  """
  import tensorflow as tf

  def crop(image):
    return preprocess.center_crop_arr(image, image_size)

  def prepare(example):
    image = tf.numpy_function(crop, [example['image']], tf.uint8, stateful=False)
    image.set_shape((image_size, image_size, 3))
    return image, tf.cast(example['label'], tf.int32)

  dataset = builder.as_dataset(split=f'{split}[{start}:{end}]', shuffle_files=False)
  if int(dataset.cardinality()) not in (end - start, tf.data.UNKNOWN_CARDINALITY):
    # A source that ignores split slicing (tfds.testing.mock_data): skip and take instead.
    dataset = builder.as_dataset(split=split, shuffle_files=False).skip(start).take(end - start)
  options = tf.data.Options()
  options.deterministic = True
  dataset = (dataset.with_options(options).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
             .batch(batch_size).prefetch(2))
  for images, labels in dataset.as_numpy_iterator():
    yield np.asarray(images), np.asarray(labels)
