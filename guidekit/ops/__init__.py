"""The math floor: every formula and convention of guidekit, each defined once, as plain functions.

* :mod:`~guidekit.ops.spaces`: prediction spaces (eps, v, flow velocity, x0), coordinates, flow time;
* :mod:`~guidekit.ops.timesteps`: timestep conventions and schedules (trailing, leading, Karras, flow);
* :mod:`~guidekit.ops.shapes`: ``append_dims``, per-sample broadcasting over 4D/5D, layouts, precision;
* :mod:`~guidekit.ops.checks`: validation (numbers, choices, finite tensors, prediction pairs);
* :mod:`~guidekit.ops.guidance`: the guidance formulas (CFG, projection, APG, rescale, CFG++, ADG, ...);
* :mod:`~guidekit.ops.energy`: SAMG's energy, normalisation, smoothing and scale maps;
* :mod:`~guidekit.ops.frequency`: the Laplacian pyramid and frequency-decoupled guidance;
* :mod:`~guidekit.ops.schedules`: guidance-scale schedules (TV-CFG, ramps, CogVideoX's dynamic CFG).

The floor imports only torch, numpy, einops and :mod:`guidekit.errors`: nothing from strategies,
samplers, backends, the engine, the registry or configs (``tests/test_imports.py`` checks it). Fast paths
sit next to the plain formula they replace and are tested equal to it.
"""
