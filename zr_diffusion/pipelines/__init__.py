"""Text-to-image pipelines: one adapter per diffusers family and the differentiable sampler.

- ``adapters``: ``ADAPTERS`` (family -> adapter class), ``load_adapter``, ``detect_family``
- ``base``: the adapter protocol and the LoRA save/load shared by all families
- ``sd``, ``sdxl``, ``flux``, ``zimage``: one adapter per family (``flow``: shared flow-matching math)
- ``sampler``: ``SamplerConfig``, ``sample`` (DRaFT-K, DRaFT-LV, ReFL, window)
- ``tiny``: ``make_tiny_t2i``, tiny offline pipelines of the real classes for tests and demos

Submodules are not imported here, so that importing one of them does not load diffusers for all.
"""
