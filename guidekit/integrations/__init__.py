"""Integrations with other libraries. Each submodule imports its library; this package imports nothing.

* :mod:`guidekit.integrations.diffusers`: run diffusers pipelines (SD 1.x, SDXL, SD3, CogVideoX, Wan,
  ModelScope) with any guidekit strategy and sampler, and adapt guiders both ways. Needs the
  ``diffusers`` extra: ``pip install 'guidekit[diffusers]'``.
"""
