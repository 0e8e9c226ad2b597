"""A user's own CDM problem for cdm-dist: which launch (angle, speed) lands its shots like these?

- prior.py: a diffusion prior over launch designs, the user's own diffusers ModelMixin (v-prediction);
- simulator.py: the fast conditional sampler, a differentiable noisy projectile simulator;
- train.py: trains the prior on "historical launches" and writes the target outcomes;
- problem.py: the `projectile` problem name this package registers with cdm-dist.
"""
