"""Hugging Face checkpoints -> capjax towers: `load(DIR) -> (module, {"params": ...})`.

DIR is either a Hugging Face model directory (`config.json` and `*.safetensors`, as
`save_pretrained` or a hub download leaves it; read with safetensors' NumPy API, no torch and
no network) or one written by `save_converted` / `tools/convert_hf.py` (`capjax_model.json`
and `params.safetensors`). The module's config comes from `config.json`; params are float32
NumPy arrays in the module's own tree (layers stacked on a leading axis). Supported:

  CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel (its image tower)  clip.CLIPVision
  ViTModel (google/vit)                                                        plain_vit.PlainViT
  GPT2LMHeadModel                                                              gpt2.GPT2
  LlamaForCausalLM (SmolLM, ...)                                               llama.Llama

Hugging Face's `nn.Linear` weights are [out, in] (transposed here); GPT-2's `Conv1D` weights
are already [in, out], its fused `c_attn` is split into the query and key/value kernels.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers bfloat16 with NumPy: safetensors.numpy reads bf16 files
import numpy as np
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

from capjax import sharding
from capjax.models import blocks, clip, gpt2, llama, plain_vit

CONVERTED_JSON = "capjax_model.json"
CONVERTED_PARAMS = "params.safetensors"
FAMILIES = {"clip_vision": clip.CLIPVision, "vit": plain_vit.PlainViT, "gpt2": gpt2.GPT2,
            "llama": llama.Llama}
ARCHITECTURES = {
    "CLIPVisionModel": "clip_vision", "CLIPVisionModelWithProjection": "clip_vision",
    "CLIPModel": "clip_vision", "ViTModel": "vit", "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
}
# Module fields that are run choices, not architecture: `load(DIR, dtype=jnp.bfloat16)`.
RUNTIME_FIELDS = ("dtype", "matmul_policy", "remat_policy", "scan_unroll")


def load(directory, **runtime):
  """(module, {"params": float32 NumPy tree}) from a Hugging Face or converted directory."""
  unknown = set(runtime) - set(RUNTIME_FIELDS)
  if unknown:
    raise ValueError(f"hf.load takes only {list(RUNTIME_FIELDS)}, got {sorted(unknown)}.")
  path = pathlib.Path(directory)
  if (path / CONVERTED_JSON).exists():
    family, config, params = _read_converted(path)
  elif (path / "config.json").exists():
    family, config, params = convert(path)
  else:
    raise ValueError(f"{path}: no config.json (Hugging Face) or {CONVERTED_JSON} (converted) "
                     "found.")
  module = FAMILIES[family](**config, **runtime)
  _check_params(module, family, params, path)
  return module, {"params": params}


def describe(directory) -> tuple[str, dict, dict]:
  """(family, module config, the source's `config.json`) of a Hugging Face or converted
  directory, without reading its tensors: what a run needs to size its model before `load`."""
  path = pathlib.Path(directory)
  if (path / CONVERTED_JSON).exists():
    meta = json.loads((path / CONVERTED_JSON).read_text())
    if meta.get("family") not in FAMILIES:
      raise ValueError(f"{path / CONVERTED_JSON}: unknown family {meta.get('family')!r}; "
                       f"expected one of {sorted(FAMILIES)}.")
    return meta["family"], meta["config"], meta.get("hf_config", {})
  if (path / "config.json").exists():
    hf_config = json.loads((path / "config.json").read_text())
    arch = _architecture(hf_config, path)
    family = ARCHITECTURES[arch]
    return family, CONFIGS[family](hf_config, arch, _Where(path, arch)), hf_config
  raise ValueError(f"{path}: no config.json (Hugging Face) or {CONVERTED_JSON} (converted) "
                   "found.")


def convert(src) -> tuple[str, dict, dict]:
  """(family, module config, params) from a Hugging Face directory."""
  src = pathlib.Path(src)
  if not (src / "config.json").exists():
    raise ValueError(f"{src}: no config.json (expected a Hugging Face model directory).")
  hf_config = json.loads((src / "config.json").read_text())
  arch = _architecture(hf_config, src)
  family = ARCHITECTURES[arch]
  config = CONFIGS[family](hf_config, arch, _Where(src, arch))
  files = sorted(src.glob("*.safetensors"))
  if not files:
    raise ValueError(f"{src}: no *.safetensors files (convert .bin checkpoints with "
                     "transformers' save_pretrained(..., safe_serialization=True)).")
  tensors = {}
  for file in files:
    tensors.update(safetensors_numpy.load_file(file))
  read = _Tensors(tensors, PREFIXES[family], _Where(src, arch))
  return family, config, MAPS[family](read, config)


def save_converted(src, dst) -> tuple[str, dict]:
  """Converts the Hugging Face directory `src` into `dst` (params + module config, and the
  tokenizer / image-processor files beside them); returns (family, module config)."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  family, config, params = convert(src)
  module = FAMILIES[family](**config)
  _check_params(module, family, params, src)
  dst.mkdir(parents=True, exist_ok=True)
  flat = {"/".join(k): np.ascontiguousarray(v)
          for k, v in traverse_util.flatten_dict(params).items()}
  safetensors_numpy.save_file(flat, dst / CONVERTED_PARAMS)
  hf_config = json.loads((src / "config.json").read_text())
  # The source's config rides along: its special token ids (bos, eos, pad) are for the tasks.
  meta = {"family": family, "config": config, "architecture": _architecture(hf_config, src),
          "hf_config": hf_config}
  (dst / CONVERTED_JSON).write_text(json.dumps(meta, indent=2) + "\n")
  for extra in src.iterdir():  # tokenizer.json, vocab.json, merges.txt, preprocessor_config...
    if extra.is_file() and extra.suffix in (".json", ".txt", ".model") and not (
        extra.name == "config.json" or extra.name.endswith(".safetensors.index.json")):
      (dst / extra.name).write_bytes(extra.read_bytes())
  return family, config


def example_input(module):
  """A batch-1 input of the module's own kind (for `init` / `eval_shape`)."""
  if isinstance(module, (gpt2.GPT2, llama.Llama)):
    return jnp.zeros((1, 1), jnp.int32)
  return jnp.zeros((1, module.image_size, module.image_size, 3), jnp.float32)


def _read_converted(path):
  meta = json.loads((path / CONVERTED_JSON).read_text())
  family = meta.get("family")
  if family not in FAMILIES:
    raise ValueError(f"{path / CONVERTED_JSON}: unknown family {family!r}; expected one of "
                     f"{sorted(FAMILIES)}.")
  if not (path / CONVERTED_PARAMS).exists():
    raise ValueError(f"{path}: missing {CONVERTED_PARAMS}.")
  flat = safetensors_numpy.load_file(path / CONVERTED_PARAMS)
  params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  return family, meta["config"], params


def _check_params(module, family: str, params: dict, path):
  """Every param the module makes is there with its shape (a missing or misshapen tensor is a
  one-line error naming it)."""
  expected = jax.eval_shape(lambda: module.init(jax.random.key(0), example_input(module)))
  want = traverse_util.flatten_dict(sharding.unbox_shapes(expected["params"]))
  got = traverse_util.flatten_dict(params)
  for key, shape in want.items():
    name = "/".join(key)
    if key not in got:
      raise ValueError(f"{path}: missing param {name!r} for {family}.")
    if tuple(got[key].shape) != tuple(shape.shape):
      raise ValueError(f"{path}: param {name!r} has shape {tuple(got[key].shape)}; {family} "
                       f"expects {tuple(shape.shape)}.")
  extra = sorted("/".join(k) for k in set(got) - set(want))
  if extra:
    raise ValueError(f"{path}: unexpected params {extra} for {family}.")


class _Where:
  """Names the source in one-line errors."""

  def __init__(self, src, arch):
    self.src, self.arch = src, arch

  def error(self, what: str) -> ValueError:
    return ValueError(f"{self.src}: {self.arch}: {what}")


def _architecture(hf_config: dict, src) -> str:
  archs = hf_config.get("architectures") or []
  for arch in archs:
    if arch in ARCHITECTURES:
      return arch
  raise ValueError(f"{src}/config.json: unsupported architecture {archs or None}; supported: "
                   f"{sorted(ARCHITECTURES)}.")


class _Tensors:
  """Float32 tensors by Hugging Face name, tried under each of the family's prefixes."""

  def __init__(self, tensors: dict, prefixes: tuple[str, ...], where: _Where):
    self.tensors, self.prefixes, self.where = tensors, prefixes, where

  def __call__(self, name: str) -> np.ndarray:
    for prefix in self.prefixes:
      if prefix + name in self.tensors:
        return np.asarray(self.tensors[prefix + name], np.float32)
    raise self.where.error(f"missing tensor {name!r} (under prefixes {list(self.prefixes)}).")

  def layers(self, pattern: str, depth: int) -> np.ndarray:
    """The tensors `pattern.format(i)` of layers 0..depth-1 stacked: [depth, ...]."""
    return np.stack([self(pattern.format(i)) for i in range(depth)])


def _t(w):
  """[..., out, in] (a Hugging Face nn.Linear weight) -> [..., in, out]."""
  return np.swapaxes(w, -1, -2)


def _norm(read, prefix: str, depth: int | None = None, bias: bool = True) -> dict:
  get = (lambda n: read(f"{prefix}.{n}")) if depth is None else (
      lambda n: read.layers(f"{prefix}.{n}", depth))
  return {"scale": get("weight"), **({"bias": get("bias")} if bias else {})}


def _attention(read, prefix: str, names: tuple[str, str, str, str], c: dict, bias: bool,
               out_bias: bool) -> dict:
  """Separate q/k/v/out nn.Linear weights of every layer -> our query, kv and out params."""
  n, heads = c["depth"], c["num_heads"]
  kv_heads = c.get("num_kv_heads") or heads
  head_dim = c.get("head_dim") or c["width"] // heads
  get = lambda name, what: read.layers(f"{prefix}.{name}.{what}", n)
  q, k, v, o = names
  d = c["width"]
  query = {"kernel": _t(get(q, "weight")).reshape(n, d, heads, head_dim)}
  kv = {"kernel": np.stack([_t(get(x, "weight")).reshape(n, d, kv_heads, head_dim)
                            for x in (k, v)], axis=2)}
  out = {"kernel": _t(get(o, "weight")).reshape(n, heads, head_dim, d)}
  if bias:
    query["bias"] = get(q, "bias").reshape(n, heads, head_dim)
    kv["bias"] = np.stack([get(x, "bias").reshape(n, kv_heads, head_dim) for x in (k, v)],
                          axis=1)
  if out_bias:
    out["bias"] = get(o, "bias")
  return {"query": query, "kv": kv, "out": out}


def _linear(read, name: str, depth: int, bias: bool = True) -> dict:
  p = {"kernel": _t(read.layers(f"{name}.weight", depth))}
  if bias:
    p["bias"] = read.layers(f"{name}.bias", depth)
  return p


def _patch_kernel(w_DxCxPxP):
  """A conv patch embedding [D, C, p, p] -> our [p * p * C, D] (rows in (y, x, c) order)."""
  d = w_DxCxPxP.shape[0]
  return w_DxCxPxP.transpose(2, 3, 1, 0).reshape(-1, d)


def _map_clip(read, c: dict) -> dict:
  n, layer = c["depth"], "encoder.layers.{}"
  params = {
      "embedding": {"proj": {"kernel": _patch_kernel(read("embeddings.patch_embedding.weight"))}},
      "cls": read("embeddings.class_embedding"),
      "pos_embedding": read("embeddings.position_embedding.weight"),
      "pre_norm": _norm(read, "pre_layrnorm"),
      "layers": {
          "attn_norm": _norm(read, f"{layer}.layer_norm1", n),
          "attention": _attention(read, f"{layer}.self_attn",
                                  ("q_proj", "k_proj", "v_proj", "out_proj"), c, True, True),
          "mlp_norm": _norm(read, f"{layer}.layer_norm2", n),
          "mlp": {"wi": _linear(read, f"{layer}.mlp.fc1", n),
                  "down": _linear(read, f"{layer}.mlp.fc2", n)},
      },
      "post_norm": _norm(read, "post_layernorm"),
  }
  if c["projection_dim"]:
    params["projection"] = {"kernel": _t(read("visual_projection.weight"))}
  return params


def _map_vit(read, c: dict) -> dict:
  n, layer = c["depth"], "encoder.layer.{}"
  return {
      "embedding": {"proj": {"kernel": _patch_kernel(
          read("embeddings.patch_embeddings.projection.weight"))}},
      "embedding_bias": read("embeddings.patch_embeddings.projection.bias"),
      "cls": read("embeddings.cls_token").reshape(-1),
      "pos_embedding": read("embeddings.position_embeddings")[0],
      "layers": {
          "attn_norm": _norm(read, f"{layer}.layernorm_before", n),
          "attention": _attention(read, f"{layer}.attention",
                                  ("attention.query", "attention.key", "attention.value",
                                   "output.dense"), c, c["qkv_bias"], True),
          "mlp_norm": _norm(read, f"{layer}.layernorm_after", n),
          "mlp": {"wi": _linear(read, f"{layer}.intermediate.dense", n),
                  "down": _linear(read, f"{layer}.output.dense", n)},
      },
      "final_norm": _norm(read, "layernorm"),
  }


def _map_gpt2(read, c: dict) -> dict:
  n, d, heads = c["depth"], c["width"], c["num_heads"]
  k = d // heads
  get = lambda name: read.layers(f"h.{{}}.{name}", n)
  # Conv1D weights are [in, out] already; c_attn's out is [q | k | v], each heads x head_dim.
  qkv_w = get("attn.c_attn.weight").reshape(n, d, 3, heads, k)
  qkv_b = get("attn.c_attn.bias").reshape(n, 3, heads, k)
  conv = lambda name: {"kernel": get(f"{name}.weight"), "bias": get(f"{name}.bias")}
  return {
      "token_embedding": read("wte.weight"),
      "pos_embedding": read("wpe.weight"),
      "layers": {
          "attn_norm": _norm(read, "h.{}.ln_1", n),
          "attention": {
              "query": {"kernel": qkv_w[:, :, 0], "bias": qkv_b[:, 0]},
              "kv": {"kernel": qkv_w[:, :, 1:], "bias": qkv_b[:, 1:]},
              "out": {"kernel": get("attn.c_proj.weight").reshape(n, heads, k, d),
                      "bias": get("attn.c_proj.bias")},
          },
          "mlp_norm": _norm(read, "h.{}.ln_2", n),
          "mlp": {"wi": conv("mlp.c_fc"), "down": conv("mlp.c_proj")},
      },
      "final_norm": _norm(read, "ln_f"),
  }


def _map_llama(read, c: dict) -> dict:
  n, layer = c["depth"], "layers.{}"
  mlp = lambda name: _t(read.layers(f"{layer}.mlp.{name}.weight", n))
  params = {
      "token_embedding": read("embed_tokens.weight"),
      "layers": {
          "attn_norm": _norm(read, f"{layer}.input_layernorm", n, bias=False),
          "attention": _attention(read, f"{layer}.self_attn",
                                  ("q_proj", "k_proj", "v_proj", "o_proj"), c, False, False),
          "mlp_norm": _norm(read, f"{layer}.post_attention_layernorm", n, bias=False),
          "mlp": {"wi": {"kernel": np.stack([mlp("gate_proj"), mlp("up_proj")], axis=2)},
                  "down": {"kernel": mlp("down_proj")}},
      },
      "final_norm": _norm(read, "norm", bias=False),
  }
  if not c["tie_embeddings"]:
    params["head"] = {"kernel": _t(read("lm_head.weight"))}
  return params


def _activation(name: str, key: str, where: _Where) -> str:
  if name not in blocks.ACTIVATIONS:
    raise where.error(f"{key}={name!r} is not supported; expected one of "
                      f"{sorted(blocks.ACTIVATIONS)}.")
  return name


def _refuse(c: dict, key: str, default, where: _Where):
  """Options these towers do not implement: a one-line error naming the config key."""
  if c.get(key, default) != default:
    raise where.error(f"{key}={c[key]!r} is not supported (only {default!r}).")


def _clip_config(hf: dict, arch: str, where: _Where) -> dict:
  v = (hf.get("vision_config") or {}) if arch == "CLIPModel" else hf
  projection_dim = 0 if arch == "CLIPVisionModel" else (
      hf if arch == "CLIPModel" else v).get("projection_dim", 512)
  return dict(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
              width=v.get("hidden_size", 768), depth=v.get("num_hidden_layers", 12),
              num_heads=v.get("num_attention_heads", 12),
              mlp_dim=v.get("intermediate_size", 3072), projection_dim=projection_dim,
              activation=_activation(v.get("hidden_act", "quick_gelu"), "hidden_act", where),
              norm_eps=v.get("layer_norm_eps", 1e-5))


def _vit_config(hf: dict, arch: str, where: _Where) -> dict:
  return dict(image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
              width=hf.get("hidden_size", 768), depth=hf.get("num_hidden_layers", 12),
              num_heads=hf.get("num_attention_heads", 12),
              mlp_dim=hf.get("intermediate_size", 3072), qkv_bias=hf.get("qkv_bias", True),
              activation=_activation(hf.get("hidden_act", "gelu"), "hidden_act", where),
              norm_eps=hf.get("layer_norm_eps", 1e-12))


def _gpt2_config(hf: dict, arch: str, where: _Where) -> dict:
  _refuse(hf, "scale_attn_by_inverse_layer_idx", False, where)
  _refuse(hf, "scale_attn_weights", True, where)
  _refuse(hf, "add_cross_attention", False, where)
  _refuse(hf, "tie_word_embeddings", True, where)
  width = hf.get("n_embd", 768)
  return dict(vocab_size=hf.get("vocab_size", 50257), max_len=hf.get("n_positions", 1024),
              width=width, depth=hf.get("n_layer", 12), num_heads=hf.get("n_head", 12),
              mlp_dim=hf.get("n_inner") or 4 * width,
              activation=_activation(hf.get("activation_function", "gelu_new"),
                                     "activation_function", where),
              norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def _llama_config(hf: dict, arch: str, where: _Where) -> dict:
  _refuse(hf, "attention_bias", False, where)
  _refuse(hf, "mlp_bias", False, where)
  # transformers 5 writes rope_parameters = {rope_theta, rope_type}; 4.x rope_theta and
  # rope_scaling.
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise where.error(f"rope_type={rope_type!r} is not supported (only 'default').")
  width, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
  return dict(vocab_size=hf.get("vocab_size", 32000), width=width,
              depth=hf.get("num_hidden_layers", 32), num_heads=heads,
              num_kv_heads=hf.get("num_key_value_heads") or heads,
              head_dim=hf.get("head_dim") or width // heads,
              mlp_dim=hf.get("intermediate_size", 11008),
              rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
              norm_eps=hf.get("rms_norm_eps", 1e-6),
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              activation=_activation(hf.get("hidden_act", "silu"), "hidden_act", where))


CONFIGS = {"clip_vision": _clip_config, "vit": _vit_config, "gpt2": _gpt2_config,
           "llama": _llama_config}
MAPS = {"clip_vision": _map_clip, "vit": _map_vit, "gpt2": _map_gpt2, "llama": _map_llama}
# Where a family's tensors live: checkpoints differ by the wrapper model they were saved from.
PREFIXES = {"clip_vision": ("vision_model.", ""), "vit": ("", "vit."),
            "gpt2": ("transformer.", ""), "llama": ("model.", "")}
