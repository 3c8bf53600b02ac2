"""The synthetic fact world: a model whose knowledge is known exactly.

- ``facts``: the deterministic generator (``generate_world``, ``World``, ``WorldSpec``).
- ``tokenizer``: a byte-level BPE trained on the world's corpus (or GPT-2's vocabulary).
- ``train``: a small Llama or GPT-2 model trained until it knows the facts.
- ``evaluate``: greedy exact-match accuracy on training and held-out templates.
- ``build``: ``build_world``, ``load_world``, ``cached_world`` (a built HF model folder).
- ``editsets``: counterfactual edit requests with rephrases and locality probes.

Only ``facts`` is cheap to import; the others pull in torch and transformers.
"""
