"""The group pipeline on a tiny synthetic latent store: interface, groupings, flips, hosts, exact resume."""

import numpy as np
import pytest

from groupdiff_jax import step_plan
from groupdiff_jax.data import latent_store, pipeline, retrieval

M, K, N, B = 96, 8, 4, 16


@pytest.fixture(scope='module')
def store_dirs(tmp_path_factory):
  """Row i's latent is the constant i (its flipped copy -i); 6 classes; clustered embeddings."""
  root = tmp_path_factory.mktemp('store')
  rows = np.arange(M, dtype=np.float32)[:, None, None, None, None]
  latents = np.concatenate([np.broadcast_to(rows, (M, 1, 32, 32, 4)), -np.broadcast_to(rows, (M, 1, 32, 32, 4))], 1)
  latent_store.write_latent_store(root / 'latents', latents.astype(np.float16), np.arange(M) % 6, {'vae': 'test'})
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((12, 16))
  emb = retrieval.l2_normalize(centres[np.arange(M) % 12] + 0.6 * rng.standard_normal((M, 16)))
  sims = emb @ emb.T
  np.fill_diagonal(sims, -np.inf)
  neighbors = np.argsort(-sims, axis=1)[:, :K]  # exact search (ScaNN would import TensorFlow: slow)
  scores = np.take_along_axis(sims, neighbors, 1)
  latent_store.write_neighbors(root / 'neighbors', neighbors, scores, {'tau': 0.7})
  return str(root / 'latents'), str(root / 'neighbors')


def make(store_dirs, grouping='official_plan', group_ratio=0.25, prefetch=0, mixed=False, **kw):
  store = latent_store.LatentStore(store_dirs[0])
  neighbors, scores, _ = latent_store.read_neighbors(store_dirs[1], len(store), N - 1)
  kinds = step_plan.step_kinds(B, N, group_ratio, mixed_steps=mixed)
  return pipeline.GroupPipeline(store, kinds, seed=3, group_ratio=group_ratio, grouping=grouping,
                                neighbors=np.asarray(neighbors), scores=scores, prefetch=prefetch, **kw), kinds


def rows_of(part):
  return np.abs(part['images'][:, 0, 0, 0]).astype(int)


def run(pipe, kinds, steps, seed=3):
  out = []
  for step in steps:
    name = step_plan.step_kind_name(seed, step, kinds, pipe.group_ratio)
    out.append((name, pipe.batch(step, kinds[name])))
  return out


def test_batches_have_the_trainer_interface_and_contiguous_groups(store_dirs):
  pipe, kinds = make(store_dirs)
  for name, parts in run(pipe, kinds, range(12)):
    (part,) = parts
    assert part['images'].shape == (B, 32, 32, 4) and part['images'].dtype == np.float32
    assert part['labels'].dtype == np.int32 and part['labels'].shape == (B,)
    rows = rows_of(part)
    np.testing.assert_array_equal(part['labels'], rows % 6)
    if name == step_plan.GROUPS:
      for anchor, *members in rows.reshape(-1, N):  # contiguous: anchor then its neighbours in rank order
        ranks = [list(pipe.neighbors[anchor]).index(m) for m in members]
        assert ranks == sorted(ranks)


def test_singles_see_every_row_once_per_epoch(store_dirs):
  pipe, kinds = make(store_dirs, group_ratio=0.0)
  seen = np.concatenate([rows_of(p[0]) for _, p in run(pipe, kinds, range(M // B))])
  np.testing.assert_array_equal(np.sort(seen), np.arange(M))


@pytest.mark.parametrize('grouping', ['official_plan', 'class', 'random'])
def test_planned_groups_are_disjoint_within_an_epoch(store_dirs, grouping):
  pipe, kinds = make(store_dirs, grouping=grouping, group_ratio=1.0)
  rows = np.concatenate([rows_of(p[0]) for _, p in run(pipe, kinds, range(pipe.steps_per_epoch))])
  plan = pipe.epoch_groups(0, N)
  assert len(rows) >= plan.size  # with every step a group step, the plan runs out (then reshuffled)
  assert len(np.unique(rows[:plan.size])) == plan.size
  if grouping == 'class':
    assert all(len(set(g % 6)) == 1 for g in rows.reshape(-1, N))


def test_tau_random_members_pass_tau_or_are_counted(store_dirs):
  pipe, kinds = make(store_dirs, grouping='tau_random', group_ratio=1.0, tau=0.75)
  fallbacks = 0
  for _, (part,) in run(pipe, kinds, range(10)):
    for anchor, *members in rows_of(part).reshape(-1, N):
      lst = list(pipe.neighbors[anchor])
      sims = np.array([pipe.scores[anchor, lst.index(m)] for m in members], np.float32)
      below = sims < 0.75
      fallbacks += below.sum()
      if below.any():  # the shortfall is the nearest below tau, after every candidate above it
        above = (np.asarray(pipe.scores[anchor], np.float32) >= 0.75).sum()
        assert below.sum() == N - 1 - above
        assert sorted(lst.index(m) for m in np.array(members)[below]) == list(range(above, N - 1))
  assert fallbacks == pipe.stats['fallback_members'] and 0 < fallbacks < pipe.stats['group_members']
  assert 0 < pipeline.tau_coverage(pipe.scores, 0.75, N) < 1


def test_stream_is_identical_after_a_restart_at_step_k(store_dirs):
  pipe, kinds = make(store_dirs, prefetch=2, random_flip=True)
  full = run(pipe, kinds, range(0, 30))
  pipe.close()
  resumed, _ = make(store_dirs, prefetch=2, random_flip=True)
  again = run(resumed, kinds, range(17, 30))
  resumed.close()
  assert [n for n, _ in full[17:]] == [n for n, _ in again]
  for (_, a), (_, b) in zip(full[17:], again):
    np.testing.assert_array_equal(a[0]['images'], b[0]['images'])
    np.testing.assert_array_equal(a[0]['labels'], b[0]['labels'])


@pytest.mark.parametrize('grouping', ['official_plan', 'tau_random'])
def test_tf_data_stream_equals_direct_assembly_through_jumps(store_dirs, grouping):
  opts = dict(grouping=grouping, random_flip=True, mixed=grouping == 'tau_random', tau=0.75)
  direct, kinds = make(store_dirs, prefetch=0, **opts)
  streamed, _ = make(store_dirs, prefetch=3, **opts)
  steps = list(range(0, 9)) + [4, 5, 6, 20, 21, 2]  # a restart, a skip ahead, a jump back
  for (name_a, a), (name_b, b) in zip(run(direct, kinds, steps), run(streamed, kinds, steps)):
    assert name_a == name_b and len(a) == len(b)
    for part_a, part_b in zip(a, b):
      assert part_a['images'].dtype == part_b['images'].dtype == np.float32
      np.testing.assert_array_equal(part_a['images'], part_b['images'])
      np.testing.assert_array_equal(part_a['labels'], part_b['labels'])
  assert direct.stats == streamed.stats and direct.stats['group_members'] > 0
  streamed.close()


def test_random_flip_picks_the_flipped_copy(store_dirs):
  pipe, kinds = make(store_dirs, random_flip=True)
  signs = np.concatenate([np.sign(p[0]['images'][:, 0, 0, 0]) for _, p in run(pipe, kinds, range(8))])
  assert (signs < 0).mean() == pytest.approx(0.5, abs=0.15)
  plain, _ = make(store_dirs)
  assert all((p[0]['images'] >= 0).all() for _, p in run(plain, kinds, range(4)))


@pytest.mark.parametrize('mixed', [False, True])
def test_hosts_slices_make_the_global_batch(store_dirs, mixed):
  opts = dict(mixed=mixed, random_flip=True, group_ratio=0.5)  # mixed: 8 singles + 2 groups of 4 per step
  global_pipe, kinds = make(store_dirs, **opts)
  # The hosts' slices from the tf.data stream in one case, assembled directly in the other.
  hosts = [make(store_dirs, process_index=i, process_count=2, prefetch=2 if mixed else 0, **opts)[0]
           for i in range(2)]
  for step in range(6):
    name = global_pipe.kind_name(step)
    whole = global_pipe.batch(step, kinds[name])
    halves = [h.batch(step, kinds[name]) for h in hosts]
    for i, part in enumerate(whole):
      for key in part:
        np.testing.assert_array_equal(part[key], np.concatenate([h[i][key] for h in halves]))


def test_wrong_settings_give_clear_errors(store_dirs):
  pipe, kinds = make(store_dirs)
  name = pipe.kind_name(0)
  other = step_plan.SINGLES if name == step_plan.GROUPS else step_plan.GROUPS
  with pytest.raises(ValueError, match='other train settings'):
    pipe.batch(0, kinds[other])
  with pytest.raises(ValueError, match='needs neighbour lists'):
    pipeline.GroupPipeline(pipe.store, kinds, seed=0, group_ratio=0.25, grouping='tau_random')


def test_trainer_make_batches_reads_the_latent_store(store_dirs):
  from configs import imagenet_latents
  from groupdiff_jax import train
  config = imagenet_latents.get_config()
  with config.unlocked():
    config.train.batch_size = B
    config.data.latent_dir, config.data.neighbors_dir = store_dirs
  batches = train.make_batches(config)
  kinds = step_plan.step_kinds(B, N, config.train.group_ratio, mixed_steps=config.train.mixed_steps)
  name = step_plan.step_kind_name(config.seed, 0, kinds, config.train.group_ratio)
  parts = batches.batch(0, kinds[name])  # the default mixed step: singles and groups
  assert [np.asarray(p['images']).shape for p in parts] == [(s.num_images, 32, 32, 4) for s in kinds[name]]
  assert sum(s.num_images for s in kinds[name]) == B
  batches.close()


def test_config_without_a_store_says_what_to_set():
  from configs import default
  config = default.get_config()
  with pytest.raises(ValueError, match='config.data.latent_dir is not set'):
    pipeline.from_config(config)


def test_fast_float16_cast_is_bit_identical_to_numpy():
  halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)  # every half: subnormals, inf, NaN
  finite = halves[np.isfinite(halves)]
  np.testing.assert_array_equal(pipeline.float16_to_float32(finite).view(np.uint32),
                                finite.astype(np.float32).view(np.uint32))
  order = np.random.default_rng(0).permutation(len(halves))
  want = np.empty(len(halves), np.float32)
  want[order] = halves
  np.testing.assert_array_equal(pipeline.float16_to_float32(halves, order).view(np.uint32), want.view(np.uint32))


def test_fast_float16_cast_is_exact_in_tf_data_threads():
  """tf.data's threads flush float32 subnormals; the cast must not depend on it."""
  tf = pytest.importorskip('tensorflow')
  halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
  finite = halves[np.isfinite(halves)]
  cast = lambda _: pipeline.float16_to_float32(finite)
  dataset = tf.data.Dataset.range(1).map(lambda i: tf.numpy_function(cast, [i], tf.float32), num_parallel_calls=2)
  (got,) = list(dataset.as_numpy_iterator())
  np.testing.assert_array_equal(got.view(np.uint32), finite.astype(np.float32).view(np.uint32))
