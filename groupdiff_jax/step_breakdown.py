"""Where a train step's HBM traffic goes, from the compiler: the step's forward, forward + backward and
whole-step programs compiled side by side (`--mode=compile` with `compile.breakdown=True`, compile_job.py).

For one step kind of batch B, besides the step itself:

  forward(B)           the step's loss,
  forward(2B)          the same at twice the batch,
  forward+backward(B)  loss and gradients, constrained to the state's parameter layout (all-reduced;
                       reduce-scattered with mesh.shard_update),

and the parts per device of the compiler's `bytes accessed` (cost_analysis; counts, not measurements):

  forward weights      2 f(B) - f(2B): what does not grow with the batch (weight reads; with
                       shard_update their gather),
  forward activations  f(2B) - f(B),
  backward             fb(B) - f(B): the backward's weight and activation reads, the gradients' writes
                       and their reduction,
  update               step(B) - fb(B): clipping, AdamW, EMA and the non-finite guard,

each also in seconds at the chip's HBM bandwidth (tpu_topology.CHIPS).
"""

import dataclasses

import jax

from groupdiff_jax import sharding
from groupdiff_jax import train_step as train_step_lib


def programs(config, mesh, state, state_sharding, name, kind, batch_of):
  """[(program name, lower_fn)] of the three programs above for step kind `name` (a tuple of SubBatch);
  batch_of(kind) -> the abstract batch of a kind."""
  doubled = tuple(dataclasses.replace(sub, num_images=2 * sub.num_images) for sub in kind)
  layout = train_step_lib.update_layout(config, state_sharding)
  batch_sharding = sharding.batch_sharding(mesh)
  common = dict(train_config=config.train, max_group_size=config.model.max_group_size,
                null_class=config.model.num_classes, model_config=config.model)

  def lower(fn, k, out_shardings):
    sharding.check_groups_fit_mesh(k, mesh)
    jitted = jax.jit(fn, in_shardings=(state_sharding, batch_sharding), out_shardings=out_shardings)

    def run():
      with sharding.use_mesh(mesh, config.mesh):
        return jitted.lower(state, batch_of(k))

    return run

  def forward(k):
    return lambda s, b: train_step_lib.step_loss_fn(s, b, k, layout=layout, **common)(s.params)

  def forward_backward(s, b):
    return train_step_lib.loss_and_grads(s, b, kind, grad_sharding=state_sharding.params, layout=layout, **common)

  replicated = sharding.replicated(mesh)
  return [(f'forward/{name}', lower(forward(kind), kind, replicated)),
          (f'forward_2x/{name}', lower(forward(doubled), doubled, replicated)),
          (f'forward_backward/{name}', lower(forward_backward, kind, (replicated, state_sharding.params)))]


def parts(programs_report, name, chip):
  """{part: {'bytes', 'hbm_seconds'}} per device (module docstring) from the report's programs of kind
  `name` (each with compiler_bytes_accessed_per_device)."""
  b = lambda program: programs_report[program]['compiler_bytes_accessed_per_device']
  forward, doubled = b(f'forward/{name}'), b(f'forward_2x/{name}')
  both, step = b(f'forward_backward/{name}'), b(f'train_step/{name}')
  out = {'forward weights': 2 * forward - doubled, 'forward activations': doubled - forward,
         'backward': both - forward, 'update': step - both, 'step': step}
  return {k: {'bytes': v, 'hbm_seconds': v / chip['hbm_bandwidth']} for k, v in out.items()}
