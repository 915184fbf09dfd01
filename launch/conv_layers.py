"""Per-layer convolution timings, JAX against PyTorch: where a train step's convolution time goes.

  PYTHONPATH=. python launch/conv_layers.py --config=configs/voc.py --out=FILE.json  # --frameworks=jax without torch

--config and --out are scaleattn.benchmark's flags.

The layers are read off the model itself (every convolution of the config's backbone on one scale-1 crop, as
`scaleattn.perf.flops.conv_layers` finds them while the model is traced); identical layers are timed once and
counted. For each layer it times, median of `--repeats` calls after two warm-up calls, the forward convolution,
the input gradient and the weight gradient: JAX through `scaleattn.kernels.cpu_conv.conv2d` (the forms the
model runs on CPU), PyTorch through `conv2d` and `aten.convolution_backward` (what autograd calls) in its default NCHW layout.
"""
from __future__ import annotations

import collections
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from scaleattn.kernels.cpu_conv import conv2d
from scaleattn.perf import flops, host_memory, measure

FLAGS = flags.FLAGS
flags.DEFINE_list("frameworks", ["jax", "torch"], "Frameworks to time (torch is optional).")
flags.DEFINE_integer("repeats", 8, "Timed calls per layer and pass.")

PASSES = ("forward", "input_grad", "weight_grad")


def backbone_layers(config) -> collections.Counter:
  """Layer -> how many times one scale-1 forward pass of one crop runs it."""
  cfg = config.model.copy_and_resolve_references()
  cfg.scales = (1.0,)
  return flops.conv_layers(cfg, config.input.crop_size, config.input.crop_size)


def jax_passes(layer: flops.Layer) -> dict[str, Callable[[], object]]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, layer.height, layer.width, layer.cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(layer.kernel, layer.kernel, layer.cin, layer.cout)) * 0.01, jnp.float32)
  g = jnp.asarray(rng.normal(size=(1, layer.height, layer.width, layer.cout)), jnp.float32)
  forward = jax.jit(lambda x, w: conv2d(x, w, layer.dilation))
  input_grad = jax.jit(lambda x, w, g: jax.vjp(lambda x_: conv2d(x_, w, layer.dilation), x)[1](g)[0])
  weight_grad = jax.jit(lambda x, w, g: jax.vjp(lambda w_: conv2d(x, w_, layer.dilation), w)[1](g)[0])
  return {"forward": lambda: forward(x, w).block_until_ready(),
          "input_grad": lambda: input_grad(x, w, g).block_until_ready(),
          "weight_grad": lambda: weight_grad(x, w, g).block_until_ready()}


def torch_passes(layer: flops.Layer) -> dict[str, Callable[[], object]]:
  import torch  # noqa: PLC0415 - optional
  torch.manual_seed(0)
  x = torch.randn(1, layer.cin, layer.height, layer.width)
  w = torch.randn(layer.cout, layer.cin, layer.kernel, layer.kernel) * 0.01
  g = torch.randn(1, layer.cout, layer.height, layer.width)
  pad, dil = layer.dilation * (layer.kernel // 2), layer.dilation

  def backward(mask):
    with torch.no_grad():
      return torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [pad, pad], [dil, dil], False, [0, 0], 1,
                                                 mask)

  def forward():
    with torch.no_grad():
      return torch.nn.functional.conv2d(x, w, padding=pad, dilation=dil)

  return {"forward": forward, "input_grad": lambda: backward([True, False, False]),
          "weight_grad": lambda: backward([False, True, False])}


def main(argv):
  del argv
  retained = host_memory.retain_on_cpu(FLAGS.retain_host_memory)
  builders = {"jax": jax_passes, "torch": torch_passes}
  rows, totals = [], {fw: dict.fromkeys(PASSES, 0.0) for fw in FLAGS.frameworks}
  for layer, count in backbone_layers(FLAGS.config).items():
    gflop = flops.layer_flops(layer) / 1e9  # per pass, padding included
    row = {**layer._asdict(), "count": count, "gflop_per_pass": gflop}
    for fw in FLAGS.frameworks:
      passes = builders[fw](layer)
      for name in PASSES:
        if layer.cin == 3 and name == "input_grad":
          continue  # the image needs no gradient
        seconds = float(np.median(measure.call_times(passes[name], FLAGS.repeats, warmup=2)))
        row[f"{fw}_{name}_ms"] = 1e3 * seconds
        totals[fw][name] += count * seconds
    print(json.dumps(row), flush=True)
    rows.append(row)
  summary = {fw: {**{k: round(v, 4) for k, v in t.items()}, "all": round(sum(t.values()), 4)}
             for fw, t in totals.items()}
  print(json.dumps({"seconds_per_scale1_pass": summary}), flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({**measure.environment(), "host_memory_retained": retained, "layers": rows,
                 "seconds_per_scale1_pass": summary}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
