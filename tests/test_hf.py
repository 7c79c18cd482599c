"""Hugging Face weight import (capjax.models.hf, tools/convert_hf.py).

Tiny random torch models with odd sizes (width 72, 3 heads, vocabulary 101) are saved with
`save_pretrained`, loaded and matched in float32. They need the test-hf extra (torch and
transformers) and skip without it; the converted-directory and error tests need neither.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from capjax.models import hf
from tools import convert_hf

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SIZES = dict(hidden_size=72, intermediate_size=100, num_hidden_layers=2, num_attention_heads=3)
VISION = dict(SIZES, image_size=24, patch_size=8)  # 9 patches + the class token
TOL = dict(atol=1e-4, rtol=0)


def _hf():
  why = "needs torch and transformers: pip install -e '.[test-hf]'"
  return (pytest.importorskip("torch", reason=why),
          pytest.importorskip("transformers", reason=why))


def _randomize(torch, model, seed=0):
  """Weights of unit-scale activations (Hugging Face's 0.02 init would leave attention nearly
  uniform and hide layout mistakes); 1-D params (norm scales, biases) near their init."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 0:  # CLIPModel's logit_scale
        continue
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(p.mean() + 0.2 * noise if p.ndim == 1 else 1.5 * noise / p[0].numel() ** 0.5)
  return model.eval()


def _load(torch, model, path):
  model.save_pretrained(path, safe_serialization=True)
  module, params = hf.load(path)
  return module, params, jax.jit(module.apply, static_argnames=("return_embedding",),
                                 compiler_options=FAST_COMPILE)


def _pixels(seed=0):
  return np.random.default_rng(seed).standard_normal((2, 24, 24, 3)).astype(np.float32)


def _nchw(torch, pixels):
  return torch.tensor(pixels.transpose(0, 3, 1, 2))


def _tokens(length=9, seed=0):
  return np.random.default_rng(seed).integers(0, 101, (2, length))


def test_clip_vision_model_hidden_states_and_pooled(tmp_path):
  torch, t = _hf()
  model = _randomize(torch, t.CLIPVisionModel(t.CLIPVisionConfig(**VISION)))
  module, params, apply = _load(torch, model, tmp_path)
  assert (module.width, module.num_heads, module.projection_dim) == (72, 3, 0)
  pixels = _pixels()
  with torch.no_grad():
    ref = model(pixel_values=_nchw(torch, pixels))
  hidden, pooled = apply(params, pixels, return_embedding=True)
  np.testing.assert_allclose(hidden, ref.last_hidden_state.numpy(), **TOL)
  np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), **TOL)


def test_clip_model_image_tower_and_projection(tmp_path):
  torch, t = _hf()
  config = t.CLIPConfig(text_config=dict(SIZES, vocab_size=101), vision_config=VISION,
                        projection_dim=40)
  model = _randomize(torch, t.CLIPModel(config))
  module, params, apply = _load(torch, model, tmp_path)
  pixels = _pixels(1)
  with torch.no_grad():
    vision = model.vision_model(pixel_values=_nchw(torch, pixels))
    embedding = model.visual_projection(vision.pooler_output)
  hidden, ours = apply(params, pixels, return_embedding=True)
  np.testing.assert_allclose(hidden, vision.last_hidden_state.numpy(), **TOL)
  np.testing.assert_allclose(ours, embedding.numpy(), **TOL)
  assert ours.shape == (2, 40)


def test_vit_model_hidden_states(tmp_path):
  torch, t = _hf()
  model = _randomize(torch, t.ViTModel(t.ViTConfig(**VISION)))
  _, params, apply = _load(torch, model, tmp_path)
  pixels = _pixels(2)
  with torch.no_grad():
    ref = model(pixel_values=_nchw(torch, pixels)).last_hidden_state.numpy()
  np.testing.assert_allclose(apply(params, pixels), ref, **TOL)


def _check_lm(torch, model, apply, params, embed_tokens):
  """Logits of tokens, and of a prefix of embeddings before them (`inputs_embeds`)."""
  tokens = _tokens()
  prefix = np.random.default_rng(5).standard_normal((2, 4, 72)).astype(np.float32)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens)).logits.numpy()
    inputs = torch.cat([torch.tensor(prefix), embed_tokens(torch.tensor(tokens))], dim=1)
    ref_prefix = model(inputs_embeds=inputs).logits.numpy()
  logits = apply(params, tokens)
  assert logits.shape == (2, 9, 101) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref, **TOL)
  np.testing.assert_allclose(apply(params, tokens, prefix), ref_prefix, **TOL)


def test_gpt2_logits_with_and_without_a_prefix(tmp_path):
  torch, t = _hf()
  config = t.GPT2Config(vocab_size=101, n_positions=32, n_embd=72, n_layer=2, n_head=3,
                        bos_token_id=0, eos_token_id=0)
  model = _randomize(torch, t.GPT2LMHeadModel(config))
  module, params, apply = _load(torch, model, tmp_path)
  assert (module.vocab_size, module.mlp_dim, module.max_len) == (101, 288, 32)
  _check_lm(torch, model, apply, params, model.transformer.wte)


def test_llama_grouped_query_attention_untied(tmp_path):
  torch, t = _hf()
  config = t.LlamaConfig(vocab_size=101, hidden_size=72, intermediate_size=100,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                         rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
  model = _randomize(torch, t.LlamaForCausalLM(config))
  module, params, apply = _load(torch, model, tmp_path)
  assert (module.num_heads, module.num_kv_heads, module.head_dim) == (6, 2, 12)
  assert (module.rope_theta, module.norm_eps, module.tie_embeddings) == (500.0, 1e-5, False)
  _check_lm(torch, model, apply, params, model.model.embed_tokens)


def test_llama_tied_single_kv_head_from_a_bfloat16_checkpoint(tmp_path):
  torch, t = _hf()
  config = t.LlamaConfig(vocab_size=101, hidden_size=72, intermediate_size=100,
                         num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                         tie_word_embeddings=True, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0)
  half = _randomize(torch, t.LlamaForCausalLM(config)).to(torch.bfloat16)
  half.save_pretrained(tmp_path, safe_serialization=True)
  assert not any("lm_head" in k for p in tmp_path.glob("*.safetensors")
                 for k in safetensors_numpy.load_file(p))  # tied: saved once
  # The reference: the bf16-rounded weights in a float32 model (not half.float(), whose RoPE
  # frequencies were rounded too).
  model = t.LlamaForCausalLM(config).eval()
  model.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
  module, params = hf.load(tmp_path)
  assert module.tie_embeddings and module.num_kv_heads == 1
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
  apply = jax.jit(module.apply, compiler_options=FAST_COMPILE)
  _check_lm(torch, model, apply, params, model.model.embed_tokens)


def _numpy_gpt2(path, drop: str = "", architecture: str = "GPT2LMHeadModel"):
  """A one-layer GPT-2 directory as a hub download lays it out (no "transformer." prefix),
  written with NumPy alone."""
  d, m, v = 8, 16, 11
  shapes = {"wte.weight": (v, d), "wpe.weight": (6, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
  for name, shape in {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d),
                      "attn.c_attn.bias": (3 * d,), "attn.c_proj.weight": (d, d),
                      "attn.c_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
                      "mlp.c_fc.weight": (d, m), "mlp.c_fc.bias": (m,),
                      "mlp.c_proj.weight": (m, d), "mlp.c_proj.bias": (d,)}.items():
    shapes[f"h.0.{name}"] = shape
  rng = np.random.default_rng(0)
  path.mkdir(parents=True, exist_ok=True)
  safetensors_numpy.save_file({k: rng.standard_normal(s).astype(np.float32)
                               for k, s in shapes.items() if k != drop},
                              path / "model.safetensors")
  config = {"architectures": [architecture], "vocab_size": v, "n_positions": 6, "n_embd": d,
            "n_layer": 1, "n_head": 2, "n_inner": m}
  (path / "config.json").write_text(json.dumps(config))
  (path / "tokenizer_config.json").write_text("{}")
  return path


def test_converted_directory_loads_the_same_module_and_params(tmp_path, capsys):
  src = _numpy_gpt2(tmp_path / "hf")
  convert_hf.main([f"--src={src}", f"--dst={tmp_path / 'out'}"])
  assert "gpt2 (GPT2)" in capsys.readouterr().err
  assert (tmp_path / "out" / "tokenizer_config.json").exists()
  module, params = hf.load(src)
  converted, converted_params = hf.load(tmp_path / "out")
  assert converted == module
  jax.tree.map(np.testing.assert_array_equal, converted_params, params)
  tokens = np.array([[1, 2, 3]])
  apply = jax.jit(module.apply, compiler_options=FAST_COMPILE)
  np.testing.assert_array_equal(apply(params, tokens), apply(converted_params, tokens))
  half, _ = hf.load(tmp_path / "out", dtype=jnp.bfloat16)
  assert half.dtype == jnp.bfloat16


def _one_line_error(path, match):
  with pytest.raises(ValueError, match=match) as error:
    hf.load(path)
  assert "\n" not in str(error.value)


def test_a_missing_tensor_is_a_one_line_error_naming_it(tmp_path, capsys):
  src = _numpy_gpt2(tmp_path / "hf", drop="h.0.mlp.c_fc.bias")
  _one_line_error(src, r"GPT2LMHeadModel: missing tensor 'h\.0\.mlp\.c_fc\.bias'")
  with pytest.raises(SystemExit) as exit_:
    convert_hf.main([f"--src={src}", f"--dst={tmp_path / 'out'}"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "c_fc.bias" in err


def test_unsupported_architectures_and_options_are_one_line_errors(tmp_path):
  _one_line_error(_numpy_gpt2(tmp_path / "bert", architecture="BertModel"),
                  r"unsupported architecture \['BertModel'\]")
  src = _numpy_gpt2(tmp_path / "inverse")
  config = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps({**config,
                                               "scale_attn_by_inverse_layer_idx": True}))
  _one_line_error(src, "scale_attn_by_inverse_layer_idx=True is not supported")
  _one_line_error(tmp_path / "nothing", "no config.json")
  llama = tmp_path / "llama3"
  llama.mkdir()
  (llama / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLM"],
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
  _one_line_error(llama, "rope_type='llama3' is not supported")
