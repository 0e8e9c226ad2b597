"""How models enter: the problem spec's schema and the factories it names (spec, factories), adapters that put any
diffusers model behind the role interfaces (adapters), learned models in diffusers' conventions (networks, learned),
checkpoint manifests, and tiny models for tests. Import the modules themselves: the adapters load diffusers."""
