"""The latent store and neighbour-list formats (docs/method.md, Data formats): round trip and clear errors."""

import ml_dtypes
import numpy as np
import pytest

from groupdiff_jax.data import latent_store


def _latents(m, flips=False, dtype=np.float16):
  shape = (m, 2, 32, 32, 4) if flips else (m, 32, 32, 4)
  return np.random.default_rng(0).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize('dtype,flips', [(np.float16, False), (ml_dtypes.bfloat16, True)])
def test_round_trip_is_memory_mapped_with_checksum(tmp_path, dtype, flips):
  lat = _latents(6, flips, dtype)
  latent_store.write_latent_store(tmp_path, lat, np.arange(6) % 3, {'vae': 'test', 'scale': 0.18215})
  store = latent_store.LatentStore(str(tmp_path), verify_checksum=True)
  assert isinstance(store.latents, np.memmap) or isinstance(store.latents.base, np.memmap)
  assert store.latents.dtype == dtype and store.has_flips == flips and len(store) == 6
  np.testing.assert_array_equal(np.asarray(store.latents, np.float32), lat.astype(np.float32))
  assert store.labels.dtype == np.int32 and store.meta['count'] == 6 and store.meta['checksum'].startswith('sha256:')


def test_errors_name_the_file_and_the_value(tmp_path):
  latent_store.write_latent_store(tmp_path, _latents(4), np.zeros(4))
  np.save(tmp_path / 'labels.npy', np.zeros(3, np.int32))
  with pytest.raises(latent_store.StoreError, match=r'labels.npy: 3 labels for 4 latent rows'):
    latent_store.LatentStore(str(tmp_path))
  np.save(tmp_path / 'labels.npy', np.zeros(4, np.int64))
  with pytest.raises(latent_store.StoreError, match=r'labels.npy: dtype int64'):
    latent_store.LatentStore(str(tmp_path))
  np.save(tmp_path / 'labels.npy', np.zeros(4, np.int32))
  np.save(tmp_path / 'latents.npy', np.zeros((4, 16, 16, 4), np.float16))
  with pytest.raises(latent_store.StoreError, match=r'latents.npy: shape \(4, 16, 16, 4\)'):
    latent_store.LatentStore(str(tmp_path))
  np.save(tmp_path / 'latents.npy', np.zeros((4, 32, 32, 4), np.float32))
  with pytest.raises(latent_store.StoreError, match=r'latents.npy: dtype float32'):
    latent_store.LatentStore(str(tmp_path))
  np.save(tmp_path / 'latents.npy', np.ones((4, 32, 32, 4), np.float16))
  with pytest.raises(latent_store.StoreError, match='checksum'):
    latent_store.LatentStore(str(tmp_path), verify_checksum=True)
  with pytest.raises(latent_store.StoreError, match='extract_latents_job'):
    latent_store.LatentStore(str(tmp_path / 'nowhere'))


def test_neighbour_lists_are_validated_against_the_store(tmp_path):
  neighbors = np.array([[1, 2], [2, 0], [0, 1]])
  latent_store.write_neighbors(tmp_path, neighbors, np.full((3, 2), 0.9), {'tau': 0.7})
  got, scores, meta = latent_store.read_neighbors(str(tmp_path), num_rows=3, min_neighbors=2)
  np.testing.assert_array_equal(got, neighbors)
  assert scores.dtype == np.float16 and meta['K'] == 2
  with pytest.raises(latent_store.StoreError, match='3 rows but the latent store has 5'):
    latent_store.read_neighbors(str(tmp_path), num_rows=5)
  with pytest.raises(latent_store.StoreError, match='K=2 neighbours per row; groups need at least 3'):
    latent_store.read_neighbors(str(tmp_path), min_neighbors=3)
  latent_store.write_neighbors(tmp_path, [[0, 2], [2, 0], [0, 1]], np.ones((3, 2)))
  with pytest.raises(latent_store.StoreError, match='lists itself'):
    latent_store.read_neighbors(str(tmp_path))
  latent_store.write_neighbors(tmp_path, [[1, 7], [2, 0], [0, 1]], np.ones((3, 2)))
  with pytest.raises(latent_store.StoreError, match=r'outside \[0, 3\)'):
    latent_store.read_neighbors(str(tmp_path))


def test_labels_at_or_above_num_classes_are_refused_naming_file_and_count(tmp_path):
  latents = np.zeros((4, 32, 32, 4), np.float16)
  labels = np.array([0, 5, 6, 1], np.int32)  # 5 is the null class of a 5-class model
  with pytest.raises(latent_store.StoreError, match=r'labels.npy: 2 labels >= model.num_classes=5'):
    latent_store.validate_latents(latents, labels, {}, labels_path='labels.npy', num_classes=5)
  latent_store.validate_latents(latents, labels, {}, num_classes=7)


def test_duplicate_or_self_ids_in_a_neighbour_row_are_refused_naming_the_row():
  rows = (np.arange(6)[:, None] + 1 + np.arange(3)) % 6  # valid: no self, no repeat
  latent_store.check_neighbor_rows(rows.astype(np.int32), 'n.npy', chunk_rows=4)
  dup = rows.copy()
  dup[5, 2] = dup[5, 0]
  with pytest.raises(latent_store.StoreError, match=r'n.npy: row 5 lists neighbour id\(s\) \[0\] more than once'):
    latent_store.check_neighbor_rows(dup, 'n.npy', chunk_rows=4)
  selfish = rows.copy()
  selfish[4, 1] = 4
  with pytest.raises(latent_store.StoreError, match='n.npy: row 4 lists itself'):
    latent_store.check_neighbor_rows(selfish, 'n.npy', chunk_rows=4)


def test_unreadable_meta_json_names_the_file(tmp_path):
  (tmp_path / 'meta.json').write_text('{"count": 3,')
  with pytest.raises(latent_store.StoreError, match=r'meta.json: not a readable JSON file'):
    latent_store.read_meta(str(tmp_path))
