"""capjax.optim.shampoo against precondition-opt's distributed_shampoo, and its state contract."""

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from capjax.optim.shampoo import (ShampooParamState, ShampooState,
                                  is_logical_axes_leaf,
                                  matrix_inverse_pth_root,
                                  independent_axes_from_logical_axes,
                                  matrix_inverse_pth_root_eigh, shampoo,
                                  state_logical_axes)

# The reference casts to float64 for its roots, which is float32 without x64.
pytestmark = pytest.mark.filterwarnings("ignore:Explicitly requested dtype")

_REMOVED_JAX_NAMES = {"tree_map": "tree_map", "tree_multimap": "tree_map",
                      "tree_leaves": "tree_leaves", "tree_flatten": "tree_flatten",
                      "tree_unflatten": "tree_unflatten",
                      "tree_structure": "tree_structure", "tree_reduce": "tree_reduce"}


@pytest.fixture(scope="module")
def reference():
  """precondition-opt 0.3.0, made importable on current JAX for this module only."""
  added = [n for n in _REMOVED_JAX_NAMES if not hasattr(jax, n)]
  for name in added:
    setattr(jax, name, getattr(jax.tree_util, _REMOVED_JAX_NAMES[name]))
  stub_chex = "chex" not in sys.modules
  if stub_chex:
    try:
      import chex  # noqa: F401
      stub_chex = False
    except ImportError:  # the reference uses chex only for annotations
      sys.modules["chex"] = types.SimpleNamespace(Array=jax.Array)
  from precondition import distributed_shampoo as ds
  yield ds
  for name in added:
    delattr(jax, name)
  if stub_chex:
    del sys.modules["chex"]


# ---------------------------------------------------------------- problem

STEPS = 30
# These programs are tiny and run a few dozen times: compiling them dominates the test time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BASE = dict(block_size=16, beta1=0.9, beta2=0.999, start_preconditioning_step=10,
            preconditioning_compute_steps=3, skip_preconditioning_dim_size_gt=48,
            skip_preconditioning_rank_lt=2, merge_small_dims_block_size=16)
# h: stacked by scan, each layer in ragged 16/4 x 16/8 blocks; b, scale: rank < 2; e: a dim
# > 48. c (a compile more, so not in every test): not stacked, three axes (p = 6) unless merged.
SHAPES = {"h": (2, 20, 24), "b": (24,), "e": (50, 4), "scale": ()}
ALL_SHAPES = {**SHAPES, "c": (4, 6, 10)}


def _init(shapes, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {k: 0.1 * jax.random.normal(key, shape)
          for key, (k, shape) in zip(keys, shapes.items())}


def _loss(params, targets, x_BxD):
  """Least squares per matrix (stable dynamics, full-rank statistics)."""
  def lsq(w, x, t):
    return jnp.mean((x @ w - x @ t) ** 2)
  p, t = params, targets
  loss = lsq(p["e"].T, x_BxD[:, :4], t["e"].T)
  for i in range(p["h"].shape[0]):
    loss += lsq(p["h"][i], x_BxD[:, 20 + i:40 + i], t["h"][i])
  if "c" in p:
    loss += lsq(p["c"].reshape(24, 10), x_BxD[:, :24], t["c"].reshape(24, 10))
  return loss + jnp.mean((jnp.tanh(p["b"]) - t["b"]) ** 2) + (p["scale"] - 1.0) ** 2


def _split(params):
  """The stacked param as independent layers, as the reference sees them."""
  out = {k: v for k, v in params.items() if k != "h"}
  out.update({f"h_{i}": h for i, h in enumerate(params["h"])})
  return out


def _unsplit(params):
  out = {k: v for k, v in params.items() if not k.startswith("h_")}
  out["h"] = jnp.stack([params[f"h_{i}"] for i in range(SHAPES["h"][0])])
  return out


def _step_fn(opt, targets, split):
  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def step(params, state, x):
    grad_params = _unsplit(params) if split else params
    grads = jax.grad(_loss)(grad_params, targets, x)
    updates, state = opt.update(_split(grads) if split else grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _compare_with_reference(ds, shapes, graft_type, **kwargs):
  """Runs both optimizers; returns the max |ours - ref| over steps and params."""
  kwargs = {**BASE, "learning_rate": 0.01, "nesterov": True, **kwargs}
  ours = shampoo(graft_type=graft_type,
                 independent_axes={k: (0,) if k == "h" else () for k in shapes}, **kwargs)
  ref_graft = getattr(ds.GraftingType, graft_type.upper())
  ref = ds.distributed_shampoo(
      graft_type=ref_graft, batch_axis_name=None, shard_optimizer_states=False,
      best_effort_memory_usage_reduction=False, generate_training_metrics=False,
      **kwargs)
  params, targets = _init(shapes, 0), _init(shapes, 1)
  xs = jax.random.normal(jax.random.PRNGKey(2), (STEPS, 32, 60))
  step_ours, step_ref = _step_fn(ours, targets, False), _step_fn(ref, targets, True)
  p, s = params, ours.init(params)
  q, r = _split(params), ref.init(_split(params))
  worst = 0.0
  for i in range(STEPS):
    p, s = step_ours(p, s, xs[i])
    q, r = step_ref(q, r, xs[i])
    for k, v in _unsplit(q).items():
      np.testing.assert_allclose(p[k], v, rtol=1e-5, atol=1e-5,
                                 err_msg=f"param {k} at step {i}")
      worst = max(worst, float(jnp.max(jnp.abs(p[k] - v))))
  # Guard against a vacuous match: the reference did compute inverse roots.
  root = r.stats["h_0"].preconditioners[0]
  assert float(jnp.max(jnp.abs(root - jnp.eye(root.shape[0])))) > 1.0
  return worst


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("graft_type", ["sgd", "adagrad", "rmsprop", "rmsprop_normalized"])
def test_matches_reference_every_step(reference, graft_type, nesterov):
  worst = _compare_with_reference(reference, SHAPES, graft_type, nesterov=nesterov)
  print(f"max |ours - reference| = {worst:.2e}")


def test_matches_reference_merged_dims(reference):
  # The reference's default merging turns every param here into a vector.
  worst = _compare_with_reference(
      reference, ALL_SHAPES, "rmsprop_normalized", block_size=64,
      merge_small_dims_block_size=4096, matrix_epsilon=1e-4)
  print(f"max |ours - reference| = {worst:.2e}")


def test_matches_reference_eigh_decay_sum_schedule(reference):
  schedule = optax.linear_schedule(0.02, 0.005, STEPS)
  worst = _compare_with_reference(
      reference, ALL_SHAPES, "rmsprop", learning_rate=schedule, eigh=True,
      weight_decay=1e-2, beta2=1.0, moving_average_for_momentum=True,
      nesterov=False)
  print(f"max |ours - reference| = {worst:.2e}")


def test_stacked_param_equals_independent_layers():
  kwargs = dict(BASE, learning_rate=0.1, start_preconditioning_step=4,
                preconditioning_compute_steps=2)
  stacked = shampoo(independent_axes={"s": (0,)}, **kwargs)
  layers = shampoo(**kwargs)
  params = {"s": 0.1 * jax.random.normal(jax.random.PRNGKey(0), (3, 16, 20))}
  split = lambda tree: {f"s{i}": v for i, v in enumerate(tree["s"])}
  s_stacked, s_layers = stacked.init(params), layers.init(split(params))
  update_stacked, update_layers = (jax.jit(opt.update, compiler_options=FAST_COMPILE)
                                   for opt in (stacked, layers))
  for i in range(8):
    grads = {"s": jax.random.normal(jax.random.PRNGKey(10 + i), (3, 16, 20))}
    u_stacked, s_stacked = update_stacked(grads, s_stacked, params)
    u_layers, s_layers = update_layers(split(grads), s_layers, split(params))
    for layer in range(3):
      np.testing.assert_allclose(u_stacked["s"][layer], u_layers[f"s{layer}"],
                                 rtol=1e-6, atol=1e-7, err_msg=f"step {i}")
  blocks = s_layers.stats["s0"].statistics.shape[0]
  assert s_stacked.stats["s"].statistics.shape == (3 * blocks, 16, 16)
  np.testing.assert_allclose(s_stacked.stats["s"].preconditioners[blocks:2 * blocks],
                             s_layers.stats["s1"].preconditioners, rtol=1e-6, atol=1e-6)


# A 2-layer attention + GeGLU block whose q/k/v and gate/up kernels are fused, as in
# capjax/models/layers.py, or separate. D=16, H=2, K=8, M=24: with merging to 16 a q kernel
# is a 16 x 16 matrix, a fused q/k/v kernel 16 x 48 unless split.
D, H, K, M, LAYERS = 16, 2, 8, 24, 2
FUSED_AXES = {"qkv": ("layers", "embed", None, "heads", "kv"),
              "out": ("layers", "heads", "kv", "embed"),
              "wi": ("embed", None, "mlp"), "down": ("mlp", "embed"), "scale": ("embed",)}
SEPARATE_AXES = {**{n: ("layers", "embed", "heads", "kv") for n in ("q", "k", "v")},
                 "out": FUSED_AXES["out"], **{n: ("embed", "mlp") for n in ("gate", "up")},
                 "down": FUSED_AXES["down"], "scale": FUSED_AXES["scale"]}


def _separate(fused):
  q, k, v = (fused["qkv"][:, :, i] for i in range(3))
  return {"q": q, "k": k, "v": v, "gate": fused["wi"][:, 0], "up": fused["wi"][:, 1],
          **{n: fused[n] for n in ("out", "down", "scale")}}


def _block_out(p, x_BxTxD):
  h_BxTxD = x_BxTxD
  for layer in range(LAYERS):
    q, k, v = (jnp.einsum("btd,dhk->bthk", h_BxTxD, p[n][layer]) for n in ("q", "k", "v"))
    weights_BxHxTxT = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k) / K ** 0.5)
    o_BxTxHxK = jnp.einsum("bhts,bshk->bthk", weights_BxHxTxT, v)
    h_BxTxD = h_BxTxD + jnp.einsum("bthk,hkd->btd", o_BxTxHxK, p["out"][layer])
  h_BxTxM = jax.nn.gelu(h_BxTxD @ p["gate"]) * (h_BxTxD @ p["up"])
  return (h_BxTxD + h_BxTxM @ p["down"]) * p["scale"]


def _fused_block_params(seed, stddev):
  shapes = {"qkv": (LAYERS, D, 3, H, K), "out": (LAYERS, H, K, D), "wi": (D, 2, M),
            "down": (M, D)}
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {**{n: stddev * jax.random.normal(key, shape)
             for key, (n, shape) in zip(keys, shapes.items())}, "scale": jnp.ones((D,))}


def test_fused_kernels_train_as_separate_kernels():
  kwargs = dict(BASE, learning_rate=3e-4, block_size=16, merge_small_dims_block_size=16,
                start_preconditioning_step=4, preconditioning_compute_steps=3,
                weight_decay=1e-3)
  teacher = _separate(_fused_block_params(1, 0.15))
  separate_loss = lambda p, x: jnp.mean((_block_out(p, x) - _block_out(teacher, x)) ** 2)
  fused = _fused_block_params(0, 0.1)
  assert independent_axes_from_logical_axes(FUSED_AXES)["qkv"] == (0, 2)
  assert independent_axes_from_logical_axes(FUSED_AXES, split_fused=False)["qkv"] == (0,)
  runs = {}
  for name, params, axes in [("fused", fused, FUSED_AXES),
                             ("separate", _separate(fused), SEPARATE_AXES)]:
    opt = shampoo(independent_axes=independent_axes_from_logical_axes(axes), **kwargs)
    loss = (lambda p, x: separate_loss(_separate(p), x)) if name == "fused" else separate_loss

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(params, state, x, opt=opt, loss=loss):
      value, grads = jax.value_and_grad(loss)(params, x)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state, value
    runs[name] = (step, params, opt.init(params), None)
  xs = jax.random.normal(jax.random.PRNGKey(7), (STEPS, 8, 6, D))
  losses = []
  for i in range(STEPS):
    for name, (step, params, state, _) in runs.items():
      runs[name] = (step, *step(params, state, xs[i]))
    expected, got = runs["separate"][1], _separate(runs["fused"][1])
    for n in expected:
      np.testing.assert_allclose(got[n], expected[n], rtol=0, atol=1e-5,
                                 err_msg=f"{n} at step {i}")
    losses.append(float(runs["separate"][3]))
  assert losses[-1] < 0.5 * losses[0], losses  # it trained (0.109 -> 0.025)
  # Fused: one 16 x 16 matrix per axis of each of q, k, v in each layer, as if separate.
  assert runs["fused"][2].stats["qkv"].statistics.shape == (LAYERS * 3 * 2, 16, 16)


@pytest.mark.parametrize("p", [2, 4, 6])
def test_eigh_roots_equal_coupled_newton(p):
  rng = np.random.RandomState(p)
  sizes = np.array([16, 16, 11, 5], np.int32)
  matrices = []
  for size in sizes:
    g = rng.randn(size, 4 * size)
    m = np.zeros((16, 16))
    m[:size, :size] = g @ g.T / (4 * size) + 0.1 * np.eye(size)  # well conditioned
    matrices.append(m)
  matrices = jnp.asarray(np.stack(matrices), jnp.float32)
  roots = lambda fn: jax.jit(jax.vmap(lambda m, s: fn(m, p, s)), compiler_options=FAST_COMPILE)
  newton, newton_err = roots(matrix_inverse_pth_root)(matrices, sizes)
  eigh, _ = roots(matrix_inverse_pth_root_eigh)(matrices, sizes)
  assert float(jnp.max(newton_err)) < 1e-5
  np.testing.assert_allclose(eigh, newton, rtol=1e-4, atol=1e-5)
  for m, root, size in zip(np.asarray(matrices, np.float64), np.asarray(newton), sizes):
    e, u = np.linalg.eigh(m[:size, :size])
    ridge = 1e-6 * e.max()
    expected = (u * (e + ridge) ** (-1.0 / p)) @ u.T
    np.testing.assert_allclose(root[:size, :size], expected, rtol=1e-4, atol=1e-5)
    assert not np.any(root[size:]) and not np.any(root[:, size:])


def _short_run(shapes):
  opt = shampoo(learning_rate=0.01,
                independent_axes={k: (0,) if k == "h" else () for k in shapes},
                **dict(BASE, start_preconditioning_step=4))
  params, targets = _init(shapes, 0), _init(shapes, 1)
  return opt, params, _step_fn(opt, targets, False)


def test_state_survives_orbax_checkpoint(tmp_path):
  opt, params, step = _short_run(SHAPES)
  xs = jax.random.normal(jax.random.PRNGKey(2), (17, 32, 60))
  state = opt.init(params)
  for i in range(12):
    params, state = step(params, state, xs[i])
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(lambda: state))
  assert isinstance(restored, ShampooState)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  p_a, s_a, p_b, s_b = params, state, params, restored
  for i in range(12, 17):
    p_a, s_a = step(p_a, s_a, xs[i])
    p_b, s_b = step(p_b, s_b, xs[i])
  for a, b in zip(jax.tree.leaves((p_a, s_a)), jax.tree.leaves((p_b, s_b))):
    np.testing.assert_array_equal(a, b)


def test_state_logical_axes_contract():
  opt, params, _ = _short_run(SHAPES)
  abstract = jax.eval_shape(opt.init, params)
  axes = state_logical_axes(abstract)
  assert (jax.tree.structure(axes, is_leaf=is_logical_axes_leaf) ==
          jax.tree.structure(abstract))
  assert axes.count == ()
  by_param = axes.stats
  assert by_param["h"].statistics == ("opt_blocks", None, None)
  assert by_param["h"].preconditioners == ("opt_blocks", None, None)
  assert by_param["h"].momentum is None
  assert by_param["e"].statistics == ()  # not preconditioned: scalar placeholder
  assert by_param["scale"].momentum == ()
  flat_axes = jax.tree.leaves(axes, is_leaf=is_logical_axes_leaf)
  for names, leaf in zip(flat_axes, jax.tree.leaves(abstract)):
    assert names is None or len(names) == leaf.ndim
  # Stacked blocks are layer-major along the one leading axis.
  assert abstract.stats["h"].statistics.shape[0] % SHAPES["h"][0] == 0

  param_axes = {"b": ("mlp",), "h": ("layers", "embed", "mlp"),
                "e": ("vocab", "embed"), "scale": ()}
  assert independent_axes_from_logical_axes(param_axes) == {
      "b": (), "h": (0,), "e": (), "scale": ()}
  named = state_logical_axes(abstract, param_axes)
  sgd_axes = state_logical_axes(jax.eval_shape(shampoo(0.1, graft_type="sgd").init, params))
  assert sgd_axes.stats["h"].diagonal_statistics == ()  # unused with sgd: placeholder
  assert named.stats["h"].momentum == ("layers", "embed", "mlp")
  assert named.stats["h"].statistics == ("opt_blocks", None, None)
  assert named.stats["b"].momentum == ("mlp",)
  assert isinstance(named.stats["b"], ShampooParamState)


def test_rejects_unknown_graft_type():
  with pytest.raises(ValueError, match="graft_type"):
    shampoo(0.1, graft_type="adam")
