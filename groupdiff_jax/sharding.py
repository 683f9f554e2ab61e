"""Device mesh and shardings.

One named mesh axis, `data`, over every device: the train state is
replicated and the batch is split along its leading (image) axis. Groups are
never split across devices: a sub-batch of G groups of N is laid out
`[G*N, ...]` with members contiguous, and G must be a multiple of the
number of devices, so each device holds whole groups and group attention
stays device-local. One device is a mesh of one.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None):
  """A 1-D mesh named ('data',) over `devices` (default: all devices)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """Leading axis split over `data`; whole groups per device (see module doc)."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_groups_fit_mesh(sub_batches, mesh):
  """Raise unless every sub-batch's groups divide evenly over the data axis."""
  devices = mesh.shape[DATA_AXIS]
  for sub in sub_batches:
    if sub.num_groups % devices:
      raise ValueError(f'{sub.num_groups} groups of {sub.group_size} images cannot be split evenly over '
                       f'{devices} devices without splitting a group; make the batch a multiple of '
                       f'{devices * sub.group_size} images.')
