"""Caption decoding for models with `encode(images)` and
`decode(tokens, enc, self_mask, decode=False)` methods (CapPa's), or for any family's
`steps.Decoder` passed in their place (`Task.decoder()`; a prefix language model's:
`decode/prefix.py`), jitted, batched, with static shapes:

  greedy(model, params, images, special=, max_new_tokens=)       the most likely token
  sample(model, params, images, rng, special=, max_new_tokens=,  temperature, top-k, top-p;
         num_samples=, temperature=, top_k=, top_p=)             n samples an image
  beam_search(model, params, images, special=, max_new_tokens=,  GNMT length penalty,
              beam_size=, num_return=, length_penalty_alpha=)   n best
  parallel(model, params, images, special=, length=,             one all-MASK pass, then
           refine_steps=)                                         optional refinement
  log_likelihood(model, params, enc, tokens, special=)           caption scores

`images` are normalized (`tasks.base.normalize_images`); `special` is the tokenizer's
`SpecialIds`. Each returns a `Decoded`: tokens int32[B, N, L] after BOS (EOS, then PAD),
best first. The autoregressive ones take min_new_tokens (EOS suppressed before), stop early
when every row has ended, and run on the decoder's KV caches; `cached=False` recomputes the
prefix each step instead (the reference for tests and bench/decode.py).
"""

from capjax.decode.beam import beam_search, length_penalty
from capjax.decode.parallel import parallel, remask
from capjax.decode.sampling import filter_logits, greedy, sample
from capjax.decode.scoring import log_likelihood
from capjax.decode.steps import Decoded, Decoder, EncoderDecoder, Steps, encode

__all__ = ["Decoded", "Decoder", "EncoderDecoder", "Steps", "beam_search", "encode",
           "filter_logits", "greedy", "length_penalty", "log_likelihood", "parallel", "remask",
           "sample"]
