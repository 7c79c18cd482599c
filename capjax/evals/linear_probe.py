"""Linear probes on frozen image features: few-shot ridge regression and logistic regression.

Features: the vision tower's output tokens (`predict_fns()["encode_images"]`, float32
[B, registers + patches, D]; the registers come first, as `models/vit.py` concatenates them),
pooled as the mean of the patch tokens, the mean of the registers, or both concatenated
(`pooling`).

Ridge probe (big_vision's `evaluators/fewshot_lsr.py`): features z-scored with the fitting set's
mean and std (+1e-5), a constant feature `BIAS_CONSTANT` appended (large, so the bias is nearly
unregularised), targets `2·onehot − 1`, the closed-form solution of `(XᵀX + λI) W = XᵀY` through
one eigendecomposition of XᵀX (or XXᵀ when there are fewer points than dimensions), argmax.
It is fitted on `shots` images per class drawn from the train split (`seeds` draws, accuracies
averaged) and on the whole train split ("full"). Unlike big_vision's fixed λ = 2**10, λ is picked
from `L2_GRID` by accuracy on held-out train images (`heldout_fraction` of the train split, never
drawn as shots); "full" is then refitted on the whole train split with that λ.

Logistic probe: softmax regression on the same z-scored features (weights and an unregularised
bias), full batch, `LOGISTIC_STEPS` steps of Adam (optax, learning rate `LOGISTIC_LR`
cosine-decayed to 0) on mean cross-entropy + wd/2·‖W‖², wd picked from `WEIGHT_DECAYS` on the held-out images, then refitted on the whole
train split.

Every probe runs on the trained encoder and on a randomly initialised one of the same config (the
baseline). `chance` is the test accuracy of always guessing the most common test class.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from capjax import evals, trained as trained_lib
from capjax.evals import labels

BIAS_CONSTANT = 100.0
L2_GRID = tuple(2.0**k for k in range(13))
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
LOGISTIC_STEPS = 300
LOGISTIC_LR = 0.1  # Adam, cosine-decayed to 0 over the steps
POOLINGS = ("patches", "registers", "both")


# ------------------------------------------------------------------------------- features


def pool_tokens(tokens_BxTxD, num_registers: int, pooling: str):
  """float32[B, D] (or [B, 2D] for "both") from registers-first tokens."""
  registers_BxD = tokens_BxTxD[:, :num_registers].mean(axis=1)
  patches_BxD = tokens_BxTxD[:, num_registers:].mean(axis=1)
  if pooling == "patches":
    return patches_BxD
  if pooling == "registers":
    return registers_BxD
  return np.concatenate([patches_BxD, registers_BxD], axis=1)


def image_features(trained, images_NxSxSx3, pooling: str, batch_size: int) -> np.ndarray:
  """float32[N, F]: pooled encoder tokens, in batches padded to `batch_size` (one compile)."""
  encode, r = trained.predict_fns()["encode_images"], trained.config.model.num_registers
  out = []
  for start in range(0, len(images_NxSxSx3), batch_size):
    chunk = images_NxSxSx3[start:start + batch_size]
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]),
                                             chunk.dtype)])
    tokens_BxTxD = np.asarray(encode(trained.params, padded))[:len(chunk)]
    out.append(pool_tokens(tokens_BxTxD, r, pooling))
  return np.concatenate(out).astype(np.float32)


def label_set_features(trained, sets: dict, pooling: str, batch_size: int) -> dict:
  """{label set: features}; an image in several sets (shapes' single-object scenes) is encoded
  once."""
  names = list(sets)
  all_images = np.concatenate([sets[n].images_uint8 for n in names])
  flat = np.ascontiguousarray(all_images.reshape(len(all_images), -1))
  keys = flat.view(np.dtype((np.void, flat.shape[1])))[:, 0]
  _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
  features = image_features(trained, all_images[first], pooling, batch_size)[inverse]
  bounds = np.cumsum([0] + [len(sets[n].labels) for n in names])
  return {n: features[bounds[i]:bounds[i + 1]] for i, n in enumerate(names)}


# ------------------------------------------------------------------------------- ridge


def standardiser(x_NxD):
  """(mean, std) of the fitting set's features, as big_vision."""
  return x_NxD.mean(axis=0), x_NxD.std(axis=0) + 1e-5


def design_matrix(x_NxD, mean_D, std_D):
  """z-scored features with the constant bias feature appended: float64[N, D + 1]."""
  z_NxD = (np.asarray(x_NxD, np.float64) - mean_D) / std_D
  return np.concatenate([z_NxD, np.full((len(z_NxD), 1), BIAS_CONSTANT)], axis=1)


def ridge_targets(labels_N, num_classes: int):
  return 2.0 * np.eye(num_classes)[labels_N] - 1.0


def ridge_solver(x_NxD, targets_NxC) -> dict:
  """One eigendecomposition from which `ridge_weights` solves for any λ."""
  n, d = x_NxD.shape
  if n >= d:
    eigs, q = np.linalg.eigh(x_NxD.T @ x_NxD)
    return {"eigs": eigs, "lhs": q, "rhs": q.T @ (x_NxD.T @ targets_NxC)}
  eigs, q = np.linalg.eigh(x_NxD @ x_NxD.T)  # W = Xᵀ(XXᵀ + λI)⁻¹Y
  return {"eigs": eigs, "lhs": x_NxD.T @ q, "rhs": q.T @ targets_NxC}


def ridge_weights(solver: dict, l2: float):
  """W[D, C] minimising ‖XW − Y‖² + λ‖W‖²."""
  return (solver["lhs"] / (solver["eigs"] + l2)) @ solver["rhs"]


def predict(x_NxD, w_DxC):
  return np.argmax(x_NxD @ w_DxC, axis=1)


def accuracy(predictions_N, labels_N) -> float:
  return float(np.mean(np.asarray(predictions_N) == np.asarray(labels_N)))


def sample_shots(labels_N, shots: int, num_classes: int, rng: np.random.Generator):
  """Indices of `shots` random examples of every class (all of a class that has fewer)."""
  return np.concatenate([rng.permutation(np.flatnonzero(labels_N == c))[:shots]
                         for c in range(num_classes)]).astype(np.int64)


def heldout_split(num_examples: int, fraction: float, rng: np.random.Generator):
  """(fit indices, held-out indices): a random `fraction` (at least one) held out."""
  order = rng.permutation(num_examples)
  n_held = min(max(1, int(round(fraction * num_examples))), num_examples - 1)
  return np.sort(order[n_held:]), np.sort(order[:n_held])


def ridge_probe(x_fit, y_fit, x_held, y_held, num_classes: int, grid=L2_GRID):
  """(λ with the best held-out accuracy, the largest on ties; {λ: held-out accuracy})."""
  mean, std = standardiser(x_fit)
  solver = ridge_solver(design_matrix(x_fit, mean, std), ridge_targets(y_fit, num_classes))
  held = design_matrix(x_held, mean, std)
  scores = {l2: accuracy(predict(held, ridge_weights(solver, l2)), y_held) for l2 in grid}
  best = max(scores.values())
  return max(l2 for l2, s in scores.items() if s == best), scores


def ridge_test_accuracy(x_fit, y_fit, x_test, y_test, num_classes: int, l2: float) -> float:
  mean, std = standardiser(x_fit)
  solver = ridge_solver(design_matrix(x_fit, mean, std), ridge_targets(y_fit, num_classes))
  return accuracy(predict(design_matrix(x_test, mean, std), ridge_weights(solver, l2)), y_test)


# ------------------------------------------------------------------------------- logistic


def logistic_loss(params, z_NxD, labels_N, weight_decay, weights_N=None, class_mask_C=None):
  """Mean cross-entropy (weighted by `weights_N`, over the classes in `class_mask_C`)
  + wd/2·‖W‖²."""
  logits_NxC = z_NxD @ params["w"] + params["b"]
  if class_mask_C is not None:
    logits_NxC = jnp.where(class_mask_C, logits_NxC, -1e9)
  ce_N = optax.softmax_cross_entropy_with_integer_labels(logits_NxC, labels_N)
  weights_N = jnp.ones_like(ce_N) if weights_N is None else weights_N
  ce = jnp.sum(weights_N * ce_N) / jnp.maximum(jnp.sum(weights_N), 1.0)
  return ce + 0.5 * weight_decay * jnp.sum(params["w"] ** 2)


def _bucket(n: int, smallest: int) -> int:
  return max(smallest, 1 << (max(n, 1) - 1).bit_length())


def logistic_fit(z_NxD, labels_N, num_classes: int, weight_decays, steps: int = LOGISTIC_STEPS):
  """{"w": [K, D, C], "b": [K, C]}: one softmax regression per weight decay.

  Rows are padded to a power of two and classes to a multiple of 8 (masked out), so that fits
  of one encoder's features share a few compiled programs."""
  n, c = len(labels_N), num_classes
  n_pad, c_pad = _bucket(n, 64), -(-c // 8) * 8
  z = np.zeros((n_pad, z_NxD.shape[1]), np.float32)
  z[:n] = z_NxD
  labels = np.zeros(n_pad, np.int32)
  labels[:n] = labels_N
  params = _logistic_fit(z, labels, (np.arange(n_pad) < n).astype(np.float32),
                         np.arange(c_pad) < c, np.asarray(weight_decays, np.float32),
                         steps=steps)
  return {"w": params["w"][..., :c], "b": params["b"][..., :c]}


@functools.partial(jax.jit, static_argnames="steps")
def _logistic_fit(z_NxD, labels_N, weights_N, class_mask_C, weight_decays_K, *, steps: int):
  schedule = optax.cosine_decay_schedule(LOGISTIC_LR, steps)

  def fit(weight_decay):
    opt = optax.adam(schedule)
    loss_grad = jax.grad(lambda p: logistic_loss(p, z_NxD, labels_N, weight_decay, weights_N,
                                                 class_mask_C))

    def step(carry, _):
      params, state = carry
      updates, state = opt.update(loss_grad(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    params = {"w": jnp.zeros((z_NxD.shape[1], class_mask_C.shape[0])),
              "b": jnp.zeros(class_mask_C.shape)}
    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), length=steps)
    return params

  return jax.vmap(fit)(weight_decays_K)


def logistic_predict(params, z_NxD):
  return np.argmax(np.asarray(z_NxD @ params["w"] + params["b"]), axis=-1)


def logistic_probe(x_train, y_train, x_test, y_test, fit_idx, held_idx, num_classes: int,
                   weight_decays=WEIGHT_DECAYS):
  """(test accuracy, chosen weight decay): chosen on the held-out images (fitting on the rest),
  then refitted on the whole train split."""
  mean, std = standardiser(x_train[fit_idx])
  fitted = logistic_fit((x_train[fit_idx] - mean) / std, y_train[fit_idx], num_classes,
                        weight_decays)
  z_held = (x_train[held_idx] - mean) / std
  scores = [accuracy(logistic_predict(jax.tree.map(lambda a: a[k], fitted), z_held),
                     y_train[held_idx]) for k in range(len(weight_decays))]
  best = max(k for k, s in enumerate(scores) if s == max(scores))
  mean, std = standardiser(x_train)
  # Refit with the whole grid (one compiled program for both fits) and keep the chosen one.
  refit = jax.tree.map(lambda a: a[best], logistic_fit((x_train - mean) / std, y_train,
                                                       num_classes, weight_decays))
  return accuracy(logistic_predict(refit, (x_test - mean) / std), y_test), weight_decays[best]


# ------------------------------------------------------------------------------- evaluator


def probe_features(x_train, y_train, x_test, y_test, num_classes: int, shots, seeds: int,
                   heldout_fraction: float) -> dict:
  """Every probe's test accuracy on one encoder's features, and the chosen regularisers."""
  fit_idx, held_idx = heldout_split(len(y_train), heldout_fraction, np.random.default_rng(0))
  x_held, y_held = x_train[held_idx], y_train[held_idx]
  out, chosen = {}, {}
  for k in shots:
    accs, l2s = [], []
    for seed in range(seeds):
      idx = fit_idx[sample_shots(y_train[fit_idx], k, num_classes, np.random.default_rng(seed))]
      l2, _ = ridge_probe(x_train[idx], y_train[idx], x_held, y_held, num_classes)
      accs.append(ridge_test_accuracy(x_train[idx], y_train[idx], x_test, y_test, num_classes,
                                      l2))
      l2s.append(l2)
    out[f"{k}shot"], chosen[f"{k}shot"] = float(np.mean(accs)), float(np.median(l2s))
  l2, _ = ridge_probe(x_train[fit_idx], y_train[fit_idx], x_held, y_held, num_classes)
  out["full"] = ridge_test_accuracy(x_train, y_train, x_test, y_test, num_classes, l2)
  chosen["full"] = l2
  out["logistic"], wd = logistic_probe(x_train, y_train, x_test, y_test, fit_idx, held_idx,
                                       num_classes)
  return {**out, "l2": chosen, "weight_decay": wd}


def chance_accuracy(labels_N, num_classes: int) -> float:
  return float(np.bincount(labels_N, minlength=num_classes).max() / max(len(labels_N), 1))


@evals.register("linear_probe")
def linear_probe(trained, *, num_train: int = 2000, num_test: int = 512,
                 shots=(1, 5, 10, 25), pooling: str = "patches", seeds: int = 3,
                 heldout_fraction: float = 0.2, baseline: bool = True, random_seed: int = 0,
                 plot: str = "", batch_size: int = 256) -> dict:
  """Top-1 of the ridge (few-shot and full) and logistic probes per label set, trained vs a
  randomly initialised encoder."""
  if pooling not in POOLINGS:
    raise ValueError(f"--pooling={pooling!r}; expected one of {POOLINGS}.")
  if pooling != "patches" and trained.config.model.num_registers == 0:
    raise ValueError(f"--pooling={pooling} needs registers; model.num_registers=0.")
  if not 0 < heldout_fraction < 1:
    raise ValueError(f"--heldout_fraction={heldout_fraction}; expected in (0, 1).")
  config, tok = trained.config, trained.tokenizer
  train_sets = labels.labelled_images(config, tok, "train", num_train, batch_size)
  test_sets = labels.labelled_images(config, tok, "test", num_test, batch_size)
  encoders = {"trained": trained}
  if baseline:
    encoders["random"] = trained_lib.randomly_initialised(trained, random_seed)
  features = {name: (label_set_features(model, train_sets, pooling, batch_size),
                     label_set_features(model, test_sets, pooling, batch_size))
              for name, model in encoders.items()}
  results = {}
  for set_name, train_set in train_sets.items():
    test_set, num_classes = test_sets[set_name], len(train_set.classes)
    if len(train_set.labels) < 2 or not len(test_set.labels):
      evals.say(f"linear_probe: skipping {set_name}: too few images")
      continue
    row = {"classes": num_classes, "num_train": len(train_set.labels),
           "num_test": len(test_set.labels),
           "chance": chance_accuracy(test_set.labels, num_classes)}
    for name, (train_features, test_features) in features.items():
      row[name] = probe_features(train_features[set_name], train_set.labels,
                                 test_features[set_name], test_set.labels, num_classes, shots,
                                 seeds, heldout_fraction)
    results[set_name] = row
    evals.say(summary(set_name, row, shots))
  if plot:
    from capjax.evals import plots  # pylint: disable=g-import-not-at-top  # matplotlib is slow
    plots.probe_accuracy(results, shots, plot)
  return {"eval": "linear_probe", "pooling": pooling, "step": trained.step,
          "label_sets": results}


def summary(set_name: str, row: dict, shots) -> str:
  lines = [f"linear_probe {set_name}: {row['classes']} classes, {row['num_train']} train / "
           f"{row['num_test']} test images, chance {row['chance']:.3f}"]
  for name in ("trained", "random"):
    if name in row:
      accs = "  ".join(f"{k}-shot {row[name][f'{k}shot']:.3f}" for k in shots)
      lines.append(f"  {name:<8} {accs}  full {row[name]['full']:.3f}  "
                   f"logistic {row[name]['logistic']:.3f}")
  return "\n".join(lines)
