"""Optional integrations of logitkit with other libraries (imported lazily).

transformers (``pip install 'logitkit[transformers]'``, see docs/transformers.md):

* ``logitkit.integrations.causal_lm``: ``apply_linear_cross_entropy(model)``, the
  causal-LM loss of a transformers model without materialising the logits.
* ``logitkit.integrations.rl``: ``token_log_probs_and_entropy(model, ...)``, per-token
  log-probs and entropies for RL fine-tuning, without the logits.
* ``logitkit.integrations.transformers``: Top-H ``LogitsProcessor``s for ``generate()``.
"""
