"""Checkpoint retention (latest K plus the best mIoU), sharded restore and fallback past a broken checkpoint."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scaleattn import checkpointing, sharding


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(checkpoint_every_steps=2, keep_checkpoints=2, keep_best=1) | kw)


def _state(v):
  return {"w": jnp.full((4, 3), float(v)), "step": jnp.asarray(v, jnp.int32)}


def test_keeps_latest_and_best(tmp_path):
  ckpts = checkpointing.Checkpoints(tmp_path / "ckpt", _cfg())
  miou = {2: 0.3, 4: 0.9, 6: 0.5, 8: 0.4}
  for step in range(1, 11):
    metrics = {"miou": miou[step]} if step in miou else None
    ckpts.save(step, _state(step), metrics=metrics, force=metrics is not None)
  ckpts.wait_until_finished()
  # Saved: 2 4 6 8 (forced, with metrics) and 10 (interval). Kept: latest two (8, 10) and the best (4).
  assert ckpts.all_steps() == [4, 8, 10]
  restored = ckpts.restore(jax.eval_shape(lambda: _state(0)), step=4)
  np.testing.assert_array_equal(restored["w"], np.full((4, 3), 4.0))
  ckpts.close()


def test_relative_directory(tmp_path, monkeypatch):
  """A workdir given relative to the current directory (as on the command line) saves and restores."""
  monkeypatch.chdir(tmp_path)
  ckpts = checkpointing.Checkpoints("runs/ckpt", _cfg())
  ckpts.save(2, _state(2))
  ckpts.wait_until_finished()
  assert ckpts.all_steps() == [2] and os.path.isdir(tmp_path / "runs" / "ckpt" / "2")
  np.testing.assert_array_equal(ckpts.restore(jax.eval_shape(lambda: _state(0)))["w"], np.full((4, 3), 2.0))
  ckpts.close()


def test_restore_onto_a_mesh_and_skip_broken(tmp_path):
  ckpts = checkpointing.Checkpoints(tmp_path / "ckpt", _cfg(keep_checkpoints=3, keep_best=0))
  for step in (2, 4):
    ckpts.save(step, _state(step))
  ckpts.wait_until_finished()
  # Break the newest checkpoint as a crash in the middle of writing would: truncate every file in it.
  for root, _, files in os.walk(tmp_path / "ckpt" / "4"):
    for f in files:
      open(os.path.join(root, f), "wb").close()
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 4}))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
                        jax.eval_shape(lambda: _state(0)))
  restored = checkpointing.Checkpoints(tmp_path / "ckpt", _cfg()).restore(target)
  assert int(restored["step"]) == 2
  assert restored["w"].sharding == NamedSharding(mesh, P())
  np.testing.assert_array_equal(restored["w"], np.full((4, 3), 2.0))


def test_nothing_to_restore(tmp_path):
  assert checkpointing.Checkpoints(tmp_path / "none", _cfg()).restore(jax.eval_shape(lambda: _state(0))) is None
